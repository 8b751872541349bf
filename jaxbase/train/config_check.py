"""Type and range checks of a run config, run before any data is read or anything is written.

ml_collections already rejects a command-line override of the wrong type
(`--config.batch_size=abc`). These checks catch what a config file itself can
get wrong: a string where a number belongs, a fractional epoch count, a
probability above 1. Keys that a config leaves out are not checked here, and
code that reads them applies its defaults.
"""

import math
from typing import Any

import ml_collections

from jaxbase.kernels import conv as kernel_conv
from jaxbase.train import nonfinite


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# key: (test, description of valid values). Tests receive the value.
_CHECKS = {
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_every_steps": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_every_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eval_flip": (lambda v: isinstance(v, bool), "true or false"),
    "max_consecutive_skips": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "on_nonfinite": (lambda v: v in nonfinite.MODES, f"one of {', '.join(nonfinite.MODES)}"),
    "checkpoint.keep": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "checkpoint.every_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "checkpoint.every_epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "augment.crop_padding": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "augment.flip": (lambda v: isinstance(v, bool), "true or false"),
    "augment.cutout": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    "augment.trivial_augment": (lambda v: isinstance(v, bool), "true or false"),
    "augment.mixup_alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "augment.cutmix_alpha": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: off)"),
    "augment.token_dropout": (
        lambda v: _is_number(v) and 0 <= v < 1,
        "a number in [0, 1) (0: off)",
    ),
    "model.drop_path_rate": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.head_dropout_rate": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "ema.decay": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1) (0: off)"),
    "optim.weight_decay_mode": (
        lambda v: v in ("default", "l2", "decoupled"),
        "one of default, l2, decoupled",
    ),
    "data.num_train_examples": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: all)"),
    "data.length_multiple": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no trim)"),
    "data.sort_window": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: no sorting)"),
    "data.subset_seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "loss.label_smoothing": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.dropout_rate": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.conv_impl": (lambda v: v in kernel_conv.IMPLS, "one of " + ", ".join(kernel_conv.IMPLS)),
    "optim.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "optim.momentum": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optim.warmup_epochs": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "optim.layer_decay": (
        lambda v: v is None or (_is_number(v) and 0 < v <= 1),
        "None or a number in (0, 1] (1: off)",
    ),
    "optim.freeze_backbone": (lambda v: isinstance(v, bool), "true or false"),
    "optim.clip_norm": (lambda v: v is None or (_is_number(v) and v > 0), "None or a number > 0"),
    "data.path": (lambda v: v is None or isinstance(v, str), "None or a path string"),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False, None
    node = node[part]
  return True, node


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every key whose value has the wrong type or lies out of range.

  Args:
    config: a run config (see jaxbase/configs/).

  Raises:
    ValueError: listing each invalid key with its value, its type and the
      values it accepts.
  """
  problems = []
  invalid_keys = []
  for key, (is_valid, expected) in _CHECKS.items():
    present, value = _lookup(config, key)
    if present and not is_valid(value):
      problems.append(f"config.{key} must be {expected}, got {value!r} ({type(value).__name__})")
      invalid_keys.append(key)
  if problems:
    raise ValueError(
        "invalid config values:\n  "
        + "\n  ".join(problems)
        + "\nFix them in the config file, or override them on the command line, e.g. "
        + f"--config.{invalid_keys[0]}=VALUE."
    )
