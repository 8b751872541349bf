"""The named improvement studies that `scripts/reproduce.py --table NAME` runs.

Every table starts from the classic baseline: a plain CNN without shortcuts
(ResNet layers with every shortcut removed), Adam at learning rate 1e-3 with a
constant schedule, no augmentation and no regularization, for a fixed number
of epochs. Each lever row changes only the keys it lists; the last row
combines the levers that help together.
"""

import ml_collections

from jaxbase.configs import digits_resnet
from jaxbase.study import Lever, Table


def _baseline(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Turns a recipe into the baseline: plain network, Adam 1e-3, nothing else."""
  config.model.plain = True
  config.model.zero_init_residual = False
  config.model.dropout_rate = 0.0
  config.model.drop_path_rate = 0.0
  config.model.head_dropout_rate = 0.0
  config.augment.crop_padding = 0
  config.augment.flip = False
  config.augment.cutout = 0
  config.augment.trivial_augment = False
  config.augment.mixup_alpha = 0.0
  config.augment.cutmix_alpha = 0.0
  config.optim.name = "adam"
  config.optim.lr = 1e-3
  config.optim.schedule = "constant"
  config.optim.warmup_epochs = 0.0
  config.optim.weight_decay = 0.0
  config.optim.weight_decay_mode = "default"
  config.optim.clip_norm = None
  config.loss.label_smoothing = 0.0
  config.ema.decay = 0.0
  config.adversarial.method = "none"
  return config


def _digits_baseline() -> ml_collections.ConfigDict:
  config = _baseline(digits_resnet.get_config())
  config.model.name = "resnet8"
  config.num_epochs = 15
  config.batch_size = 64
  config.eval_batch_size = 120  # 360 test images: three full batches.
  # One evaluation and one checkpoint at the end keep each run short.
  config.eval_every_epochs = 15
  config.checkpoint.every_epochs = 15
  config.checkpoint.keep = 1
  config.log_every_steps = 100
  return config


SGD_ONECYCLE = {
    "optim.name": "sgd",
    "optim.lr": 0.1,
    "optim.momentum": 0.9,
    "optim.nesterov": True,
    "optim.schedule": "onecycle",
}

DIGITS = Table(
    name="levers-digits",
    base_config=_digits_baseline,
    levers=(
        Lever("residual", {"model.plain": False}, "ResNet-8 with its shortcuts"),
        Lever("sgd + one-cycle", SGD_ONECYCLE, "SGD, Nesterov 0.9, one-cycle peaking at 0.1"),
        Lever("crop", {"augment.crop_padding": 1}, "random crop after 1-pixel zero padding"),
        Lever("mixup", {"augment.mixup_alpha": 0.2}, "mixup with Beta(0.2, 0.2)"),
        Lever(
            "weight decay (L2)",
            {"optim.weight_decay": 5e-4, "optim.weight_decay_mode": "l2"},
            "L2 penalty 5e-4 added to the gradient before Adam",
        ),
        Lever(
            "weight decay (decoupled)",
            {"optim.weight_decay": 0.05, "optim.weight_decay_mode": "decoupled"},
            "AdamW decay 0.05, decoupled from the adaptive step",
        ),
        Lever("label smoothing", {"loss.label_smoothing": 0.1}, "label smoothing 0.1"),
        Lever("head dropout", {"model.head_dropout_rate": 0.2}, "dropout 0.2 before the head"),
        Lever("ema", {"ema.decay": 0.99}, "evaluate a moving average of the weights, decay 0.99"),
        Lever(
            "fgsm-rs training",
            {"adversarial.method": "fgsm_rs", "adversarial.eps": 0.1},
            "FGSM adversarial training from a random start, L-inf eps 0.1",
        ),
    ),
    combined=("residual", "sgd + one-cycle", "crop", "label smoothing", "ema"),
    seeds=3,
    robust_attack=("pgd10", 0.1),
    budget="15 epochs of the 1,437 training digits at batch 64 (22 steps each, 330 in all), ResNet-8 layers",
)

TABLES = {table.name: table for table in (DIGITS,)}


def get(name: str) -> Table:
  """Returns the table called `name`, or raises ValueError listing the known ones."""
  if name not in TABLES:
    raise ValueError(f"unknown table {name!r}; known tables: {', '.join(TABLES)}")
  return TABLES[name]
