"""Options of ``mosaic-fast train`` / ``eval``: most of the seed's names (dash or underscore form) and ours.

Most seed options keep their names and defaults (``--pretrained``, ``--adapter_mode``,
``--freeze_backbone``, ``--num_rounds``, ``--batch_size``, ``--lr``, ``--adapter_bottleneck_a/b/c``,
``--ema_momentum``, ``--ema_momentum_3d``, ``--consist_weight``, ``--early_stopping_patience``,
``--seed``, ...); every option is accepted as ``--num_rounds`` and as ``--num-rounds``. The differences
are listed in README.md (``--data_root`` defaults to ./data; ``--datasets``, comma- or space-separated,
replaces ``--dataset_list``, ``--only_2d`` and ``--only_3d``; ``--eval_every``, ``--save_every``,
``--exp_name`` and the v1-only ``--adapter_bottleneck`` do not exist). Numeric options are checked here
(range, finiteness), so a bad value fails before any data is read, naming the option. ``--help`` shows
every default; a bad option gives a three-line error (:class:`~mosaic_fast.cliutil.ShortUsageParser`).
``--demo`` changes the defaults to a small model on the packaged demo subset; flags given explicitly
still win.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from ..cliutil import DefaultsHelpFormatter, ShortUsageParser
from ..data.demo import DEMO_DATASETS, DEMO_ROOT
from ..data.registry import ALL_DATASETS, SIZES_2D, SIZES_3D, resolve_datasets
from ..models.weights import VIT_B16_URL
from .metrics import METRIC_MODES

#: MosaicModel constructor arguments that a checkpoint records (and ``eval`` rebuilds the model from).
MODEL_KEYS = (
    "embed_dim", "depth", "num_heads", "adapter_mode", "adapter_bottleneck_a", "adapter_bottleneck_b",
    "adapter_bottleneck_c", "adapter_scalar", "img_size_2d", "patch_size_2d", "img_size_3d", "patch_size_3d",
)

#: ``--demo``: a small model on the packaged subset, a few minutes on 2 CPU cores. Width 128 with 4 heads
#: (rather than 192/3) trains stably at lr 5e-4 from scratch and costs half as much per step; every round
#: takes the whole Breast/Retina training subsets and 636 AdrenalMNIST3D volumes (an equal share of 1908).
DEMO_DEFAULTS = {
    "data_root": str(DEMO_ROOT),
    "datasets": ",".join(DEMO_DATASETS),
    "embed_dim": 128, "depth": 4, "num_heads": 4,
    "img_size_2d": 28, "patch_size_2d": 4, "img_size_3d": 28, "patch_size_3d": 7,
    "num_rounds": 16, "warmup_rounds": 0, "batch_size": 16, "lr": 5e-4,
    "samples_per_round": 1908, "early_stopping_patience": 16, "output_dir": "./output/demo",
}


def _add(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *aliases: str, **kw) -> None:
    """Add ``--name`` together with its dash form (``--num-rounds``) and any extra aliases."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    flags += list(aliases)
    p.add_argument(*flags, dest=name, **kw)


def _number(text: str, kind: type) -> int | float:
    """``kind(text)``, with argparse's "argument --x: ..." message instead of "invalid _f value"."""
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _seed(text: str) -> int:
    """numpy's global generator takes seeds in [0, 2**32)."""
    value = _number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text}")
    return value


def _finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    _add(p, "data_root", default="./data", help="folder holding the official MedMNIST npz files")
    _add(p, "datasets", nargs="+", default=None, metavar="NAME",
         help="datasets (names or medmnist flags, any case), comma- or space-separated, e.g. "
              "breastmnist,adrenalmnist3d or breastmnist adrenalmnist3d (default: all 18 in train, those the "
              "checkpoint trained on in eval)")
    _add(p, "download", action="store_true",
         help="fetch missing npz files from Zenodo through the medmnist package (MD5-checked)")
    _add(p, "size_2d", type=int, choices=SIZES_2D, default=None,
         help="2D file size to read (28/64/128/224); default: the model's input size if present, else the "
              "largest present. Images are resized to the model's input size")
    _add(p, "size_3d", type=int, choices=SIZES_3D, default=None, help="3D file size to read (28/64), as --size_2d")
    _add(p, "device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: the local rank's GPU)")
    _add(p, "precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
         help="auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on CPU")
    _add(p, "metrics", default="medmnist", choices=METRIC_MODES,
         help="medmnist: official getACC/getAUC; mosaic: the seed's variant (ordinal ±1, absent classes skipped)")
    _add(p, "num_workers", type=_nonnegative_int, default=None,
         help="data loader workers (default: 4 on CUDA, 0 on CPU)")
    _add(p, "eval_batch_size", type=_positive_int, default=128, help="batch size of validation and test")
    _add(p, "reference_model", action="store_true",
         help="build the model from the plain reference modules instead of the fast ones (same weights)")
    _add(p, "compile", action="store_true",
         help="torch.compile the transformer encoders (student and teacher): fuses the elementwise work "
              "around the GEMMs; the first batches of each shape and routing compile first (minutes for ViT-B)")


def _parser(prog: str, **kw) -> ShortUsageParser:
    """A parser with short error messages and defaults shown in ``--help``.

    allow_abbrev=False: a prefix of an option (--num_r) is refused like any unknown option, not guessed.
    """
    return ShortUsageParser(prog=prog, allow_abbrev=False, formatter_class=DefaultsHelpFormatter, **kw)


def train_parser() -> argparse.ArgumentParser:
    """Parser of ``mosaic-fast train``."""
    p = _parser("mosaic-fast train", description="Train MOSAIC on MedMNIST (cyclic rounds).")
    _add(p, "demo", action="store_true",
         help="small model on the packaged real MedMNIST subset (no download; a few minutes on a CPU)")
    _add_common(p)
    _add(p, "interleaved", "--use_interleaved", "--use-interleaved", action="store_true",
         help="alternate 2D and 3D datasets in the round (seed order)")
    _add(p, "mixed_batches", action="store_true",
         help="each batch mixes datasets and specialists (2D and 3D parts) instead of one dataset at a time")
    _add(p, "samples_per_round", type=_positive_int, default=None,
         help="balanced subsampling: this many training samples per round, an equal share per dataset "
              "(all of a dataset smaller than its share, so a round can hold fewer) (default: every sample "
              "of every dataset)")

    m = p.add_argument_group("model")
    _add(m, "pretrained", default=None, metavar="NPZ",
         help=f"Google's ImageNet-21k ViT-B_16.npz to load into the backbone ({VIT_B16_URL})")
    _add(m, "adapter_mode", default="v2_moe", choices=("v2_moe",),
         help="adapter design (only the seed's mixture of specialists A/B/C)")
    _add(m, "adapter_bottleneck_a", type=_positive_int, default=64, help="bottleneck of specialist A (colour 2D)")
    _add(m, "adapter_bottleneck_b", type=_positive_int, default=96, help="bottleneck of specialist B (grey 2D)")
    _add(m, "adapter_bottleneck_c", type=_positive_int, default=192, help="bottleneck of specialist C (3D)")
    _add(m, "adapter_scalar", type=_finite_float, default=0.1, help="fixed scale of the adapter output")
    _add(m, "freeze_backbone", action="store_true", help="train adapters, heads and the 3D tokenizer only")
    _add(m, "freeze_3d_tokenizer", action="store_true",
         help="with --freeze_backbone also freeze the 3D tokenizer and pos_embed_3d (the seed code's choice)")
    _add(m, "embed_dim", type=_positive_int, default=768, help="token width (ViT-B: 768)")
    _add(m, "depth", type=_positive_int, default=12, help="number of transformer blocks")
    _add(m, "num_heads", type=_positive_int, default=12, help="attention heads (must divide --embed_dim)")
    _add(m, "img_size_2d", type=_positive_int, default=224, help="model input size of 2D images")
    _add(m, "patch_size_2d", type=_positive_int, default=16, help="2D patch size (must divide --img_size_2d)")
    _add(m, "img_size_3d", type=_positive_int, default=64, help="model input size of 3D volumes")
    _add(m, "patch_size_3d", type=_positive_int, default=8, help="3D patch size (must divide --img_size_3d)")

    t = p.add_argument_group("training")
    _add(t, "num_rounds", type=_positive_int, default=50, help="rounds (one pass over every dataset each)")
    _add(t, "batch_size", type=_positive_int, default=32, help="per process (global batch = this × world size)")
    _add(t, "lr", type=_positive_float, default=1e-4, help="peak AdamW learning rate")
    _add(t, "weight_decay", type=_nonnegative_float, default=0.01, help="AdamW weight decay")
    _add(t, "warmup_rounds", type=_nonnegative_int, default=None,
         help="linear warm-up rounds (default: 5 as the seed, at most --num_rounds - 1)")
    _add(t, "min_lr", type=_nonnegative_float, default=1e-6, help="learning rate at the end of the cosine")
    _add(t, "consist_weight", type=_nonnegative_float, default=0.1,
         help="weight of the student-teacher CLS feature MSE in the loss")
    _add(t, "ema_momentum", type=_unit_float, default=0.9, help="EMA momentum of specialists A and B")
    _add(t, "ema_momentum_3d", type=_unit_float, default=0.95, help="EMA momentum of specialist C")
    _add(t, "max_grad_norm", type=_positive_float, default=1.0, help="gradient clipping norm")
    _add(t, "early_stopping_patience", type=_positive_int, default=5,
         help="stop after this many rounds without a better mean validation ACC")
    _add(t, "early_stopping_min_delta", type=_nonnegative_float, default=1e-3,
         help="a drop in mean validation ACC larger than this counts against the patience")
    _add(t, "seed", type=_seed, default=42, help="seed of initialisation, batch plans and augmentation")
    _add(t, "output_dir", default="./output", help="where checkpoints, history and results go")
    _add(t, "resume", default=None, metavar="CHECKPOINT",
         help="checkpoint to continue from (OUTPUT_DIR/last.pt; a folder means its last.pt); give the "
              "options it was trained with (see the args.json next to it)")
    _add(t, "checkpoint_every", type=_nonnegative_int, default=0,
         help="also write last.pt every N steps (0: at the end of each round only)")
    _add(t, "max_steps", type=_positive_int, default=None, help="stop (with a checkpoint) after this many steps in all")
    return p


def eval_parser() -> argparse.ArgumentParser:
    """Parser of ``mosaic-fast eval``."""
    p = _parser(
        "mosaic-fast eval", description="Evaluate a MOSAIC checkpoint on MedMNIST.",
        epilog="Data settings default to those the checkpoint recorded in training (data root, file size "
               "per dataset), so eval reads the files training read; options given here win. Datasets "
               "the checkpoint never trained on (e.g. through --datasets) are evaluated with a warning: "
               "their heads are untrained, so they are marked * and left out of the mean (unless no "
               "trained dataset is selected).",
    )
    _add(p, "checkpoint", required=True, help="a checkpoint written by train (best.pt, last.pt) or by the seed")
    _add_common(p)
    p.set_defaults(data_root=None)
    _add(p, "split", default="test", choices=("val", "test"), help="which split to evaluate")
    _add(p, "output_dir", default=None, help="where the table goes (default: the checkpoint's folder)")
    return p


def parse_train_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``train`` options (``--demo`` first sets its defaults) and check them together."""
    p = train_parser()
    first, _ = p.parse_known_args(argv)
    if first.demo:
        p.set_defaults(**DEMO_DEFAULTS)
    args = p.parse_args(argv)
    args.datasets = _datasets_or_error(p, args.datasets) or ALL_DATASETS
    not_bundled = [n for n in args.datasets if n not in DEMO_DATASETS]
    if first.demo and not_bundled and Path(args.data_root).resolve() == DEMO_ROOT:
        p.error(f"--demo bundles only {', '.join(DEMO_DATASETS)}; for {', '.join(not_bundled)} give --data_root: "
                "a folder with the official npz files, or with --download the folder to fetch them into (not the "
                "bundled one, which is part of the installed package)")
    if args.img_size_2d % args.patch_size_2d or args.img_size_3d % args.patch_size_3d:
        p.error("--img_size_2d / --img_size_3d must be divisible by --patch_size_2d / --patch_size_3d")
    if args.embed_dim % args.num_heads:
        p.error(f"--embed_dim ({args.embed_dim}) must be divisible by --num_heads ({args.num_heads})")
    if args.warmup_rounds is None:
        args.warmup_rounds = min(5, args.num_rounds - 1)
    if not 0 <= args.warmup_rounds < args.num_rounds:
        p.error(f"--warmup_rounds must be in [0, --num_rounds), got {args.warmup_rounds}")
    if args.freeze_3d_tokenizer and not args.freeze_backbone:
        p.error("--freeze_3d_tokenizer only makes sense with --freeze_backbone")
    return args


def parse_eval_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``eval`` options; ``--datasets`` becomes canonical names (an unknown one is a usage error)."""
    p = eval_parser()
    args = p.parse_args(argv)
    args.datasets = _datasets_or_error(p, args.datasets)
    return args


def _datasets_or_error(p: argparse.ArgumentParser, given: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Canonical names of ``--datasets``: one string (a default) or the words given, each of which may
    hold comma-separated names (``a,b c`` is a, b and c)."""
    if not given:
        return None
    text = given if isinstance(given, str) else ",".join(given)
    try:
        return resolve_datasets(text)
    except ValueError as err:
        p.error(str(err))
