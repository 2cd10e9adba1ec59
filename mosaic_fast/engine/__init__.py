"""Training and evaluation engine for MOSAIC on MedMNIST (commands: :mod:`.commands`)."""

from .evaluator import NonFiniteOutputError, evaluate, format_table, predict, save_table
from .metrics import METRIC_MODES, compute_metrics
from .trainer import NonFiniteLossError, RoundSchedule, StudentStep, Trainer, TrainSettings

__all__ = [
    "METRIC_MODES",
    "NonFiniteLossError",
    "NonFiniteOutputError",
    "RoundSchedule",
    "StudentStep",
    "TrainSettings",
    "Trainer",
    "compute_metrics",
    "evaluate",
    "format_table",
    "predict",
    "save_table",
]
