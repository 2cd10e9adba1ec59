"""``mosaic-fast train`` and ``mosaic-fast eval``: build data, model and trainer from the options.

Both return an exit code: 0 on success, 2 for bad options, files or checkpoints (the message says
which), 1 when the model diverged (a non-finite loss, or non-finite logits in evaluation) or a
``--download`` failed, 130 on Ctrl-C. Errors are printed as one message, without a traceback. Run under ``torchrun``
for several GPUs or nodes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import backend
from ..data.datasets import MedMNISTSplit, MultiSource
from ..data.npz import DownloadError, find_all_npz
from ..data.registry import ALL_DATASETS, NUM_CLASSES, dataset_spec, training_order
from ..models import EMATeacher, MosaicModel, load_vit_npz
from ..models.weights import VIT_B16_URL, require_weights_file
from . import checkpoint as ckpt_io
from .config import MODEL_KEYS, parse_eval_args, parse_train_args
from .distributed import DistInfo, barrier, setup, teardown
from .evaluator import NonFiniteOutputError, evaluate, format_table, save_table
from .metrics import summarize
from .trainer import NonFiniteLossError, Trainer, TrainSettings, trainable_summary


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--precision`` (None: fp32). Mixed precision needs CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision != "fp32" and device.type != "cuda":
        raise ValueError(f"--precision {precision} needs a CUDA device (got {device}); use fp32 or auto")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def build_split(
    names: Sequence[str], split: str, args: argparse.Namespace, info: DistInfo, img_size_2d: int, img_size_3d: int,
    file_sizes: dict[str, int | None] | None = None,
) -> MultiSource:
    """One :class:`MultiSource` of ``split`` over ``names`` (local rank 0 downloads first if asked).

    File sizes: ``file_sizes[name]`` where given, else ``--size_2d`` / ``--size_3d`` (None: see
    :func:`find_npz`). Without ``--download`` every file is looked for first, so that all the missing
    ones are reported in one error, before any file is read.
    """

    def sizes(name: str) -> tuple[int | None, int]:
        is_3d = dataset_spec(name).is_3d
        size = (file_sizes or {}).get(name, args.size_3d if is_3d else args.size_2d)
        return size, img_size_3d if is_3d else img_size_2d

    def make(download: bool) -> MultiSource:
        if not download:
            find_all_npz(args.data_root, [(name, *sizes(name)) for name in names])
        sources = []
        for name in names:
            size, input_size = sizes(name)
            sources.append(MedMNISTSplit(
                name, split, args.data_root, input_size=input_size, file_size=size, download=download,
            ))
        return MultiSource(sources)

    if args.download and info.enabled:
        data = make(True) if info.local_rank == 0 else None
        barrier(info)
        return data if data is not None else make(False)
    return make(args.download)


def _workers(args: argparse.Namespace, info: DistInfo) -> int:
    if args.num_workers is not None:
        return args.num_workers
    return 4 if info.device.type == "cuda" else 0


def _seed_everything(seed: int) -> None:
    """Seed the global generators and, as the seed's ``set_seed``, make cuDNN pick deterministic
    algorithms (the 2D tokenizer's Conv2d and the reference model's Conv3d run on cuDNN), so that a
    resumed run can match an uninterrupted one on a GPU too."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds the legacy global generator third-party code may use)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _load_pretrained(model: MosaicModel, path: str) -> list[str]:
    """:func:`load_vit_npz`, with errors that name the file and say whether it is a ViT npz at all."""
    try:
        return load_vit_npz(model, path)
    except (KeyError, ValueError) as err:
        try:
            with np.load(path) as npz:
                keys = list(npz.files)
        except Exception:  # not an npz at all: load_vit_npz's message already names the file
            raise err from None
        if not any(k.startswith("Transformer/encoderblock_") for k in keys):
            raise ValueError(
                f"--pretrained {path} is not a Google ViT checkpoint: it has no Transformer/encoderblock_* "
                f"arrays (it holds {keys[:5]}{' ...' if len(keys) > 5 else ''}). Pass Google's ImageNet-21k "
                f"ViT-B_16.npz ({VIT_B16_URL})."
            ) from None
        raise ValueError(
            f"--pretrained {path} does not fit the model ({err}); --depth, --embed_dim and --patch_size_2d "
            f"must match the checkpoint's (ViT-B/16: 12, 768, 16)"
        ) from None


def _print_files(data: MultiSource) -> None:
    """Which npz file each dataset is read from, its size and the model input size it is resized to."""
    for ds in data.sources:
        power = "³" if ds.spec.is_3d else "²"
        print(f"  {ds.spec.name:<16} {ds.path} ({ds.file_size}{power} → {ds.input_size}{power}), "
              f"{ds.split} {len(ds)}, expert {ds.spec.expert}")


def _chance_table(train: MultiSource, test: MultiSource) -> str:
    """Chance levels: ACC of always predicting the training set's majority class; AUC 50%."""
    lines = ["chance level (majority class of the training labels; AUC 50.00)",
             f"{'dataset':<16} {'ACC':>13} {'AUC':>13}"]
    for tr, te in zip(train.sources, test.sources):
        if tr.spec.task.startswith("multi-label"):
            acc = float((te.labels == (tr.labels.float().mean(0) > 0.5).long()).float().mean())
        else:
            majority = int(torch.bincount(tr.labels[:, 0]).argmax())
            acc = float((te.labels[:, 0] == majority).float().mean())
        lines.append(f"{tr.spec.name:<16} {100 * acc:13.2f} {50.0:13.2f}")
    return "\n".join(lines)


def _warn(args: argparse.Namespace, info: DistInfo) -> None:
    """Warnings about legitimate but surprising option combinations, printed once at the start."""
    if info.is_main and args.freeze_backbone and not args.pretrained and not args.demo:
        print("mosaic-fast train: warning: --freeze_backbone without --pretrained: the frozen backbone keeps its "
              "random initialisation, so the adapters and heads learn on random features "
              f"(fine for a smoke test; to train for real pass --pretrained ViT-B_16.npz, from {VIT_B16_URL})",
              file=sys.stderr)


def _make_output_dir(path: str | Path, info: DistInfo) -> Path:
    """Create the ``--output_dir`` folder (rank 0, the one that writes) before any data is read or model
    built, so that one that cannot be made fails at once, by its option, not after the work it was to hold."""
    path = Path(path)
    try:
        if info.is_main:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"--output_dir {path}: cannot create the folder ({err.strerror or err})") from None
    return path


def _compile(command: str, info: DistInfo, *models: MosaicModel) -> None:
    """``--compile`` with a warning where it slows the fast model down: on CPU its float32 GEMMs run on
    oneDNN only eagerly (under torch.compile they are Inductor's), so the compiled step is the slower one."""
    if info.is_main and info.device.type == "cpu" and any(m.fast for m in models):
        print(f"mosaic-fast {command}: warning: --compile on CPU: the fast model's float32 GEMMs run on oneDNN "
              "only eagerly, so compiled it is slower here (a training step took 1.5x as long on a 2-core Zen 5); "
              "--compile is meant for CUDA", file=sys.stderr)
    for model in models:
        model.compile_encoder()


def _run_args(args: argparse.Namespace) -> dict:
    """The options as recorded in args.json and the checkpoints (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def _check_resume(args: argparse.Namespace, names: Sequence[str], model_cfg: dict, info: DistInfo) -> tuple[Path, dict]:
    """Load the ``--resume`` checkpoint and compare its recorded options with these, before any data is
    read: a missing or unreadable file, a ``best.pt`` or another model / dataset list fails at once."""
    path, ckpt = ckpt_io.load_for_resume(args.resume)
    current = {"model": model_cfg, "datasets": list(names), "args": _run_args(args),
               "data": {"size_2d": args.size_2d, "size_3d": args.size_3d, "root": str(Path(args.data_root).resolve())}}
    noted = ckpt_io.check_resume_config(path, ckpt.get("config") or {}, current)
    if noted and info.is_main:
        print(f"mosaic-fast train: note: --resume {path} was trained with {'; '.join(noted)}", file=sys.stderr)
    return path, ckpt


def _train(args: argparse.Namespace, info: DistInfo) -> int:
    _seed_everything(args.seed)
    dtype = amp_dtype(args.precision, info.device)
    names = training_order(args.datasets, args.interleaved)
    model_cfg = {k: getattr(args, k) for k in MODEL_KEYS}
    _warn(args, info)
    if args.pretrained:
        require_weights_file(args.pretrained)
    resume = _check_resume(args, names, model_cfg, info) if args.resume else None
    out_dir = _make_output_dir(args.output_dir, info)
    sizes = (args.img_size_2d, args.img_size_3d)
    train = build_split(names, "train", args, info, *sizes)
    val = build_split(names, "val", args, info, *sizes)
    test = build_split(names, "test", args, info, *sizes)

    student = MosaicModel(NUM_CLASSES, **model_cfg, fast=not args.reference_model)
    if args.pretrained:
        loaded = _load_pretrained(student, args.pretrained)
        if info.is_main:
            print(f"loaded {len(loaded)} tensors from {args.pretrained}")
    if args.freeze_backbone:
        student.freeze_backbone(freeze_3d_tokenizer=args.freeze_3d_tokenizer, verbose=False)
    teacher = EMATeacher(student)
    if args.compile:
        _compile("train", info, student, teacher.model)
    if info.is_main:
        print(f"device {info.device} × {info.world_size} process(es), precision "
              f"{'fp32' if dtype is None else str(dtype).removeprefix('torch.')}")
        print(trainable_summary(student, names))
        _print_files(train)

    config = {"model": model_cfg, "datasets": list(names),
              "data": {"size_2d": args.size_2d, "size_3d": args.size_3d,
                       "root": str(Path(args.data_root).resolve()),
                       "file_sizes": {ds.spec.name: ds.file_size for ds in train.sources}},
              "args": _run_args(args)}
    settings = TrainSettings(
        num_rounds=args.num_rounds, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_rounds=args.warmup_rounds, min_lr=args.min_lr, consist_weight=args.consist_weight,
        ema_momentum=args.ema_momentum, ema_momentum_3d=args.ema_momentum_3d, max_grad_norm=args.max_grad_norm,
        early_stopping_patience=args.early_stopping_patience,
        early_stopping_min_delta=args.early_stopping_min_delta, seed=args.seed,
        samples_per_round=args.samples_per_round, mixed_batches=args.mixed_batches, metrics=args.metrics,
        eval_batch_size=args.eval_batch_size, num_workers=_workers(args, info), amp_dtype=dtype,
        checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, config=config,
    )
    trainer = Trainer(student, teacher, train, val, test, settings, info, out_dir)
    if resume is not None:
        trainer.resume(*resume)
        del resume  # a full last.pt (optimizer state included) can be large: free it before training
    if info.is_main:
        (out_dir / "args.json").write_text(json.dumps(config["args"], indent=2))
    t0 = time.time()
    results = trainer.fit()
    if info.is_main and results is not None:
        if args.demo:
            print(_chance_table(train, test))
        print(f"done in {time.time() - t0:.1f} s; outputs in {out_dir}")
    return 0


def _check_backend(device: torch.device) -> None:
    """Backend "triton" (``MOSAIC_FAST_BACKEND``) where its kernels cannot run (CPU without Triton's
    interpreter, no triton package) fails here, as a usage error, before any data is read."""
    if backend.get_backend() != "triton":
        return
    try:
        backend.require_triton("backend 'triton' (MOSAIC_FAST_BACKEND)", torch.empty(0, device=device))
    except RuntimeError as err:
        raise ValueError(str(err)) from None


def _interrupted(command: str, args: argparse.Namespace, started: float) -> str:
    """The message for Ctrl-C: for a train, how to continue: from the last.pt it wrote since ``started``, else
    from the checkpoint it resumed (a last.pt older than the run is another run's, not offered)."""
    if command != "train":
        return f"mosaic-fast {command}: interrupted"
    last = Path(args.output_dir) / "last.pt"
    if last.is_file() and last.stat().st_mtime >= started:
        return (f"mosaic-fast train: interrupted; {last} holds the last checkpoint written: continue with "
                f"the same options and --resume {last}")
    if args.resume:
        return (f"mosaic-fast train: interrupted before its first checkpoint; continue with the same options "
                f"(--resume {args.resume})")
    return "mosaic-fast train: interrupted before its first checkpoint"


def _run(command: str, body: Callable[[argparse.Namespace, DistInfo], int], args: argparse.Namespace) -> int:
    """Set up (DDP when launched by torchrun), run ``body(args, info)`` and tear down; a diverged model
    (non-finite loss or logits) or a failed download exits 1, bad input or a file problem 2, Ctrl-C 130,
    each with one message and no traceback."""
    info, finished, started = None, False, time.time()
    try:
        info = setup(args.device)
        _check_backend(info.device)
        code = body(args, info)
        finished = True
        return code
    except (NonFiniteLossError, NonFiniteOutputError) as err:
        print(f"mosaic-fast {command}: {err}", file=sys.stderr)
        return 1
    except DownloadError as err:
        print(f"mosaic-fast {command}: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"mosaic-fast {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(command, args, started), file=sys.stderr)
        return 130
    finally:
        if info is not None:
            teardown(synchronize=finished)


def train_main(argv: Sequence[str]) -> int:
    """``mosaic-fast train``: cyclic (or mixed-batch) training with validation, early stopping, test."""
    return _run("train", _train, parse_train_args(list(argv)))


def _recorded_data(args: argparse.Namespace, config: dict, names: Sequence[str]
                   ) -> tuple[dict[str, int | None], list[str]]:
    """Fill ``args.data_root`` and pick each dataset's file size from what training recorded in the
    checkpoint, where not given on the command line, so eval reads the files training read. Returns the
    sizes and which of these settings ("data root", "file sizes") came from the checkpoint."""
    data_cfg = config.get("data", {})
    recorded_root = data_cfg.get("root") or config.get("args", {}).get("data_root")
    used = ["data root"] if args.data_root is None and recorded_root is not None else []
    if args.data_root is None:
        args.data_root = recorded_root or "./data"
    sizes, sizes_used = {}, False
    for name in names:
        is_3d = dataset_spec(name).is_3d
        given = args.size_3d if is_3d else args.size_2d
        recorded = data_cfg.get("file_sizes", {}).get(name, data_cfg.get("size_3d" if is_3d else "size_2d"))
        sizes[name] = given if given is not None else recorded
        sizes_used |= given is None and recorded is not None
    return sizes, used + (["file sizes"] if sizes_used else [])


def _eval(args: argparse.Namespace, info: DistInfo) -> int:
    ckpt = ckpt_io.load(args.checkpoint)
    out_dir = _make_output_dir(args.output_dir, info) if args.output_dir else Path(args.checkpoint).parent
    config = ckpt.get("config") or {}
    model_cfg = config.get("model", {})  # a seed checkpoint: the ViT-B/16 defaults
    trained = config.get("datasets")  # None: a seed checkpoint, trained on all 18
    names = training_order(args.datasets or tuple(trained or ALL_DATASETS))
    untrained = [n for n in names if trained is not None and n not in trained]
    student = MosaicModel(NUM_CLASSES, **model_cfg, fast=not args.reference_model)
    teacher = MosaicModel(NUM_CLASSES, **model_cfg, fast=not args.reference_model)
    ckpt_io.load_model_state(student, ckpt["student_state_dict"], f"{args.checkpoint}: student_state_dict")
    ckpt_io.load_model_state(teacher, ckpt["teacher_state_dict"], f"{args.checkpoint}: teacher_state_dict")
    student.to(info.device)
    teacher.to(info.device)
    if args.compile:
        _compile("eval", info, student, teacher)
    img_2d = model_cfg.get("img_size_2d", 224)
    img_3d = model_cfg.get("img_size_3d", 64)
    file_sizes, recorded = _recorded_data(args, config, names)
    try:
        data = build_split(names, args.split, args, info, img_2d, img_3d, file_sizes)
    except FileNotFoundError as err:
        if not recorded:
            raise
        options = " and ".join({"data root": "--data_root", "file sizes": "--size_2d/--size_3d"}[k] for k in recorded)
        raise FileNotFoundError(f"{err} (eval used the {' and '.join(recorded)} that training recorded in the "
                                f"checkpoint; give {options} to choose others)") from None
    mean_over = [n for n in names if n not in untrained]
    if info.is_main:
        _print_files(data)
        if untrained:
            print(f"mosaic-fast eval: warning: the checkpoint never trained on {', '.join(untrained)} (it trained "
                  f"on {', '.join(trained)}): their heads are untrained, so their numbers mean nothing; they "
                  f"are marked *{' and left out of the mean' if mean_over else ''}", file=sys.stderr)
    kw = dict(batch_size=args.eval_batch_size, info=info, mode=args.metrics,
              amp_dtype=amp_dtype(args.precision, info.device), num_workers=_workers(args, info), progress=True)
    results = {}
    for name, model in (("student", student), ("teacher", teacher)):
        try:
            results[name] = evaluate(model, data, **kw, model_name=name)
        except NonFiniteOutputError as err:
            raise NonFiniteOutputError(f"{args.checkpoint}: {err}: the checkpoint holds a diverged model") from None
    if untrained and mean_over:
        is_3d = {n: dataset_spec(n).is_3d for n in names}
        results = {m: {**{n: res[n] for n in names}, **summarize({n: res[n] for n in mean_over}, is_3d),
                       "mean_datasets": mean_over} for m, res in results.items()}
    if info.is_main:
        title = f"{args.split} ({args.metrics} metrics): {args.checkpoint}"
        print(format_table(results, names, title, untrained))
        save_table(results, names, out_dir, f"eval_{args.split}_{args.metrics}")
        print(f"table saved to {out_dir / f'eval_{args.split}_{args.metrics}.csv'} (and .json)")
    return 0


def eval_main(argv: Sequence[str]) -> int:
    """``mosaic-fast eval --checkpoint PATH``: per-dataset ACC/AUC of student and teacher."""
    return _run("eval", _eval, parse_eval_args(list(argv)))
