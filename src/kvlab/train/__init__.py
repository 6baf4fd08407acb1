"""Training: the seed-000 loop (single process or torchrun DDP), its optimiser, loss terms and presets.

Entry point: `train(model_cfg, train_cfg, data_dir, out_dir, ...) -> run_dir`; `kvlab train` is the CLI.
"""

from kvlab.train.loop import TrainingDiverged, train
from kvlab.train.optim import configure_optimizer, lr_at, param_groups, select_trainable
from kvlab.train.presets import TRAIN_PRESETS, train_preset
from kvlab.train.terms import LossTerm, cross_entropy, distillation_terms, kl_to_teacher, total_loss

__all__ = [
    "TRAIN_PRESETS",
    "LossTerm",
    "TrainingDiverged",
    "configure_optimizer",
    "cross_entropy",
    "distillation_terms",
    "kl_to_teacher",
    "lr_at",
    "param_groups",
    "select_trainable",
    "total_loss",
    "train",
    "train_preset",
]
