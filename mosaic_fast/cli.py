"""The ``mosaic-fast`` command: ``info``, ``train``, ``eval``, ``bench``.

Each sub-command lives in its own module with its own argument parser; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "info": ("mosaic_fast.info", "main", "print versions, device and which fast paths are available"),
    "train": ("mosaic_fast.engine.commands", "train_main", "train MOSAIC on MedMNIST"),
    "eval": ("mosaic_fast.engine.commands", "eval_main", "evaluate a checkpoint on MedMNIST"),
    "bench": ("mosaic_fast.bench.run", "main", "benchmark fast paths against the reference"),
}


def _usage() -> str:
    lines = ["usage: mosaic-fast <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines.append("\n`mosaic-fast <command> --help` for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mosaic-fast: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
