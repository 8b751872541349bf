"""The named improvement studies that `scripts/reproduce.py --table NAME` runs.

Every table starts from the classic baseline: a plain CNN without shortcuts
(ResNet layers with every shortcut removed), Adam at learning rate 1e-3 with a
constant schedule, no augmentation and no regularization, for a fixed number
of epochs. Each lever row changes only the keys it lists; the last row
combines the levers that help together.
"""

import ml_collections

from jaxbase.configs import cifar10_folder_resnet20, digits_resnet, sst2_bert, sst2_bert_mlm
from jaxbase.study import Lever, Pretraining, Table, pretrained


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

# Levers shared by the image tables.
RESIDUAL = Lever("residual", {"model.plain": False}, "ResNet-8 with its shortcuts")
SGD = Lever("sgd + one-cycle", SGD_ONECYCLE, "SGD, Nesterov 0.9, one-cycle peaking at 0.1")
MIXUP = Lever("mixup", {"augment.mixup_alpha": 0.2}, "mixup with Beta(0.2, 0.2)")
L2 = Lever(
    "weight decay (L2)",
    {"optim.weight_decay": 5e-4, "optim.weight_decay_mode": "l2"},
    "L2 penalty 5e-4 added to the gradient before Adam",
)
DECOUPLED = Lever(
    "weight decay (decoupled)",
    {"optim.weight_decay": 0.05, "optim.weight_decay_mode": "decoupled"},
    "AdamW decay 0.05, decoupled from the adaptive step",
)
SMOOTHING = Lever("label smoothing", {"loss.label_smoothing": 0.1}, "label smoothing 0.1")
HEAD_DROPOUT = Lever(
    "head dropout", {"model.head_dropout_rate": 0.2}, "dropout 0.2 before the head"
)
EMA = Lever("ema", {"ema.decay": 0.99}, "evaluate a moving average of the weights, decay 0.99")

DIGITS = Table(
    name="levers-digits",
    base_config=_digits_baseline,
    levers=(
        RESIDUAL,
        SGD,
        Lever("crop", {"augment.crop_padding": 1}, "random crop after 1-pixel zero padding"),
        MIXUP,
        L2,
        DECOUPLED,
        SMOOTHING,
        HEAD_DROPOUT,
        EMA,
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


def _short_run(
    config: ml_collections.ConfigDict, model_name: str, eval_batch_size: int
) -> ml_collections.ConfigDict:
  """Sets the model and batch sizes, with one evaluation and one checkpoint at the end."""
  config.model.name = model_name
  config.batch_size = 128
  config.eval_batch_size = eval_batch_size
  config.eval_every_epochs = config.num_epochs
  config.checkpoint.every_epochs = config.num_epochs
  config.checkpoint.keep = 1
  config.log_every_steps = 50
  return config


# CIFAR-10 comes from the JPEG folder, or any CIFAR-10 image folder given as data.path.
# The whole table (17 rows, 3 seeds) must fit about 90 minutes on 2 CPU cores, so a
# run trains ResNet-8 layers on 500 images per class for 8 epochs, about 100 seconds
# with its evaluation. Every row has the same budget.
def _cifar_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return _short_run(config, "resnet8", eval_batch_size=500)


def _cifar_baseline() -> ml_collections.ConfigDict:
  config = _baseline(cifar10_folder_resnet20.get_config())
  config.data.num_train_examples = 5_000  # 500 per class, drawn with data.subset_seed.
  config.num_epochs = 8
  return _cifar_settings(config)


CIFAR10 = Table(
    name="levers-cifar10",
    base_config=_cifar_baseline,
    levers=(
        RESIDUAL,
        Lever("deeper: 20 layers", {"model.name": "resnet20"}, "plain 20-layer network"),
        SGD,
        Lever(
            "crop + flip",
            {"augment.crop_padding": 4, "augment.flip": True},
            "random crop after 4-pixel zero padding, and horizontal flips",
        ),
        Lever("cutout", {"augment.cutout": 8}, "one zeroed 8x8 square per image"),
        Lever(
            "trivialaugment", {"augment.trivial_augment": True}, "one random operation per image"
        ),
        MIXUP,
        Lever("cutmix", {"augment.cutmix_alpha": 1.0}, "cutmix with Beta(1, 1)"),
        L2,
        DECOUPLED,
        SMOOTHING,
        HEAD_DROPOUT,
        EMA,
        Lever("gradient clipping", {"optim.clip_norm": 1.0}, "global gradient norm clipped at 1"),
        Lever(
            "fgsm-rs training",
            {"adversarial.method": "fgsm_rs", "adversarial.eps": 8 / 255},
            "FGSM adversarial training from a random start, L-inf eps 8/255",
        ),
    ),
    combined=("residual", "sgd + one-cycle", "crop + flip", "label smoothing", "ema"),
    seeds=3,
    robust_attack=("pgd10", 8 / 255),
    robust_examples=500,
    budget=(
        "8 epochs of 5,000 CIFAR-10 (JPEG) training images, 500 per class, at batch 128 "
        "(39 steps each, 312 in all), ResNet-8 layers unless the row says otherwise; "
        "evaluation on the 10,000 test images"
    ),
)


# Transfer on images: pretrain on the first five CIFAR-10 classes, then learn
# the other five from 10% of their training labels (500 per class).
def _cifar_first_half() -> ml_collections.ConfigDict:
  config = _baseline(cifar10_folder_resnet20.get_config())
  config.model.plain = False
  config.data.classes = (0, 1, 2, 3, 4)
  config.num_epochs = 10
  config.update_from_flattened_dict(SGD_ONECYCLE)
  config.augment.crop_padding = 4
  config.augment.flip = True
  return _cifar_settings(config)


def _cifar_second_half_baseline() -> ml_collections.ConfigDict:
  config = _baseline(cifar10_folder_resnet20.get_config())
  config.model.plain = False
  config.data.classes = (5, 6, 7, 8, 9)
  config.data.num_train_examples = 2_500  # 10% of the 25,000 training images of the five.
  config.num_epochs = 30
  config.update_from_flattened_dict(SGD_ONECYCLE)
  config.augment.crop_padding = 4
  config.augment.flip = True
  return _cifar_settings(config)


FIRST_HALF = pretrained("cifar10-classes-0-4")

TRANSFER_CIFAR10 = Table(
    name="transfer-cifar10",
    base_config=_cifar_second_half_baseline,
    levers=(
        Lever(
            "fine-tune",
            {"init.checkpoint": FIRST_HALF, "optim.lr": 0.02},
            "start from the five-class run, every layer trained, peak learning rate 0.02",
        ),
        Lever(
            "linear probe",
            {"init.checkpoint": FIRST_HALF, "optim.freeze_backbone": True},
            "start from the five-class run and train the head only",
        ),
    ),
    combined=(),
    seeds=3,
    budget=(
        "the baseline trains ResNet-8 from scratch on classes 5-9 of CIFAR-10 (JPEG) with 500 "
        "training images per class, 30 epochs at batch 128 (19 steps each), SGD one-cycle "
        "peaking at 0.1, crop + flip; the transfer rows start from one ResNet-8 trained on all "
        "25,000 images of classes 0-4 for 10 epochs, whose time is not in the rows"
    ),
    pretraining=(
        Pretraining(
            FIRST_HALF.name,
            _cifar_first_half,
            "ResNet-8 on the 25,000 training images of classes 0-4, 10 epochs",
        ),
    ),
)


# SST-2 (binary sentiment) from TSV files: bert_tiny (2 layers, width 128) on
# 10,000 training sentences, scored on the 872-sentence dev set.
def _text_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return _short_run(config, "bert_tiny", eval_batch_size=128)


def _sst2_baseline() -> ml_collections.ConfigDict:
  config = sst2_bert.get_config()
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.optim.name = "adam"
  config.optim.lr = 1e-3
  config.optim.schedule = "constant"
  config.optim.warmup_epochs = 0.0
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = None
  config.ema.decay = 0.0
  config.data.num_train_examples = 10_000
  config.num_epochs = 4
  return _text_settings(config)


def _sst2_mlm() -> ml_collections.ConfigDict:
  config = sst2_bert_mlm.get_config()
  config.num_epochs = 4
  return _text_settings(config)


SST2_MLM = pretrained("sst2-mlm")

SST2 = Table(
    name="levers-sst2",
    base_config=_sst2_baseline,
    levers=(
        Lever("wider + deeper: bert_mini", {"model.name": "bert_mini"}, "4 layers of width 256"),
        Lever("mean pooling", {"model.pool": "mean"}, "head on the mean of the token outputs"),
        Lever(
            "dropout",
            {"model.dropout_rate": 0.1, "model.attention_dropout_rate": 0.1},
            "dropout 0.1, attention dropout 0.1",
        ),
        Lever("token dropout", {"augment.token_dropout": 0.1}, "10% of word tokens set to [MASK]"),
        Lever(
            "warmup + cosine",
            {"optim.schedule": "cosine", "optim.warmup_epochs": 1.0},
            "one warmup epoch, then cosine decay",
        ),
        Lever(
            "weight decay (decoupled)",
            {"optim.name": "adamw", "optim.weight_decay": 0.01},
            "AdamW decay 0.01",
        ),
        Lever("label smoothing", {"loss.label_smoothing": 0.1}, "label smoothing 0.1"),
        Lever("ema", {"ema.decay": 0.99}, "evaluate a moving average of the weights, decay 0.99"),
        Lever("gradient clipping", {"optim.clip_norm": 1.0}, "global gradient norm clipped at 1"),
        Lever(
            "mlm pretraining",
            {"init.checkpoint": SST2_MLM, "optim.lr": 3e-4},
            "fine-tune from MLM pretraining on the 67,349 training sentences, learning rate 3e-4",
        ),
    ),
    combined=("dropout", "warmup + cosine", "weight decay (decoupled)", "ema", "mlm pretraining"),
    seeds=3,
    budget=(
        "4 epochs of 10,000 SST-2 training sentences at batch 128 (78 steps each, 312 in all), "
        "bert_tiny unless the row says otherwise; the MLM row fine-tunes one bert_tiny "
        "pretrained for 4 epochs on all 67,349 training sentences, whose time is not in the row"
    ),
    pretraining=(
        Pretraining(SST2_MLM.name, _sst2_mlm, "bert_tiny MLM on the 67,349 training sentences"),
    ),
)

TABLES = {table.name: table for table in (DIGITS, CIFAR10, TRANSFER_CIFAR10, SST2)}


def get(name: str) -> Table:
  """Returns the table called `name`, or raises ValueError listing the known ones."""
  if name not in TABLES:
    raise ValueError(f"unknown table {name!r}; known tables: {', '.join(TABLES)}")
  return TABLES[name]
