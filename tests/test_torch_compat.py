"""The custom ops' signatures stay inferable by the oldest torch that pyproject.toml admits.

torch.library.custom_op infers each op's schema from its annotations. Before torch 2.7 that inference
accepts ``typing.Sequence[int]``/``typing.List[int]`` but not ``list[int]`` or
``collections.abc.Sequence[int]``, and evaluates string annotations in its own module, where ``Sequence``
is typing's. So a module that registers ops keeps ``from __future__ import annotations`` (string
annotations) and writes no builtin generics (``list[...]``, ``dict[...]``) in an op's parameters: with
torch 2.6, ``bottlenecks: list[int]`` made ``import mosaic_fast`` fail (found 2026-12-02; the suite then
ran on torch 2.6). CI has one torch, so this checks the rule statically.
"""

from __future__ import annotations

import ast
from pathlib import Path

OPS = Path(__file__).resolve().parents[1] / "mosaic_fast" / "ops"
BUILTIN_GENERICS = ("list[", "dict[", "set[", "frozenset[", "type[")


def _is_custom_op(decorator: ast.expr) -> bool:
    func = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(func, ast.Attribute) and func.attr == "custom_op"


def _custom_ops(ops_dir: Path) -> list[tuple[Path, ast.Module, ast.FunctionDef]]:
    found = []
    for path in sorted(ops_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(_is_custom_op(d) for d in node.decorator_list):
                found.append((path, tree, node))
    return found


def _has_future_annotations(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)


def signature_problems(ops_dir: Path) -> tuple[int, list[str]]:
    """(number of custom ops found, what old torch's schema inference would reject)."""
    ops = _custom_ops(ops_dir)
    problems = []
    for path, tree, fn in ops:
        if not _has_future_annotations(tree):
            problems.append(f"{path.name}: registers {fn.name} without `from __future__ import annotations`")
        for arg in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs:
            text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
            if any(g in text for g in BUILTIN_GENERICS):
                problems.append(f"{path.name}: {fn.name}({arg.arg}: {text}): use Sequence[...] (typing's on old torch)")
    return len(ops), problems


def test_custom_op_signatures_are_inferable_by_old_torch():
    found, problems = signature_problems(OPS)
    assert found >= 10, "the scan no longer finds the custom ops"
    assert not problems, "\n".join(problems)


def test_the_rule_flags_a_builtin_generic_and_string_annotations_missing(tmp_path):
    (tmp_path / "bad_op.py").write_text(
        'import torch\n\n@torch.library.custom_op("x::y", mutates_args=())\n'
        "def op(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:\n    return x\n", encoding="utf-8")
    found, problems = signature_problems(tmp_path)
    assert found == 1 and len(problems) == 2
    assert "without `from __future__ import annotations`" in problems[0] and "sizes: list[int]" in problems[1]
