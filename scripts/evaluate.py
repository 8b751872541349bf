"""Evaluate a training run's checkpoint on its test split.

  python scripts/evaluate.py --workdir runs/digits [--checkpoint best] \
      [--override data.path=/new/place/cifar10-jpeg.tar.gz]

Prints the metrics as JSON and writes them to WORKDIR/eval_{latest,best}.json.
"""

import json
import os

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.

from absl import app, flags  # noqa: E402

from jaxbase import logs  # noqa: E402
from jaxbase.train.loop import evaluate_checkpoint  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A training work directory.")
_CHECKPOINT = flags.DEFINE_enum(
    "checkpoint",
    "latest",
    ["latest", "best"],
    "Which checkpoint: the newest, or the best by eval accuracy.",
)
_OVERRIDES = flags.DEFINE_multi_string(
    "override",
    [],
    "KEY=VALUE replacing a value of the saved config, e.g. data.path=/data/x.tar.gz.",
)


def _parse_overrides(pairs: list[str]) -> dict[str, str]:
  overrides = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--override expects KEY=VALUE, got {pair!r}")
    overrides[key] = value
  return overrides


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  results = evaluate_checkpoint(
      _WORKDIR.value, _CHECKPOINT.value, _parse_overrides(_OVERRIDES.value)
  )
  print(json.dumps(results, indent=2))
  with open(os.path.join(_WORKDIR.value, f"eval_{_CHECKPOINT.value}.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  logs.show_own_info_only()
  app.run(main)
