"""Evaluate a training run's checkpoint on its test split, optionally under attack.

  python scripts/evaluate.py --workdir runs/digits [--checkpoint best] \
      [--override data.path=/new/place/cifar10-jpeg.tar.gz]

  python scripts/evaluate.py --workdir runs/cifar10 --attacks fgsm,pgd20,pgd50x10 \
      --eps 0,2/255,4/255,8/255

Without --attacks it prints the clean metrics as JSON and writes them to
WORKDIR/eval_{latest,best}.json. With --attacks it measures clean and robust
top-1 for every attack and eps over the whole test set and writes
WORKDIR/robustness_{latest,best}.json and a plot of accuracy against eps
(.png). Attack names: fgsm, pgdK (K steps, random start), pgdKxR (R restarts);
pgd50x10 is the standard strong check.
A run whose config sets eval_flip is scored, and attacked, by the mean of the
logits of each image and its mirror image. `--override eval_flip=false` (or
`=true`, also for runs saved before the option existed) changes that.
An input error (a missing run, a bad --override) ends with a one-line message
and exit status 1; --traceback shows where it was raised.
"""

import fractions
import json
import os

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.
hostdevices.keep_freed_memory()

from absl import app, flags  # noqa: E402

from jaxbase import cli, logs, robustness  # noqa: E402
from jaxbase.train.loop import evaluate_checkpoint, restore_for_eval  # noqa: E402

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
_ATTACKS = flags.DEFINE_list(
    "attacks", [], "Attacks for robust accuracy: fgsm, pgdK or pgdKxR, e.g. fgsm,pgd20,pgd50x10."
)
_EPS = flags.DEFINE_list(
    "eps",
    ["0", "2/255", "4/255", "8/255"],
    "Attack radii in pixel units; fractions like 8/255 work.",
)
_NORM = flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Norm of the perturbation ball.")
_STEP_SIZE_RATIO = flags.DEFINE_float(
    "step_size_ratio", 0.25, "PGD step size as a fraction of eps (0.25: 2/255 at eps 8/255)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the PGD random starts.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples",
    0,
    "Attack this many test images (0: all), drawn at random with a fixed seed so every "
    "checkpoint sees the same ones. A PGD-k pass costs about k + 1 clean passes.",
)


def _parse_overrides(pairs: list[str]) -> dict[str, str]:
  overrides = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not key:
      raise ValueError(f"--override expects KEY=VALUE, got {pair!r}")
    overrides[key] = value
  return overrides


def _parse_eps(values: list[str]) -> list[float]:
  try:
    return [float(fractions.Fraction(value)) for value in values]
  except (ValueError, ZeroDivisionError) as error:
    raise ValueError(f"--eps expects numbers or fractions like 8/255, got {values}") from error


@cli.report_input_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  overrides = _parse_overrides(_OVERRIDES.value)
  which = _CHECKPOINT.value
  if _NUM_EXAMPLES.value < 0:
    raise ValueError(
        f"--num_examples must be >= 0 (0 attacks every test image), got {_NUM_EXAMPLES.value}"
    )
  if _NUM_EXAMPLES.value and not _ATTACKS.value:
    raise ValueError("--num_examples selects the images to attack; add --attacks or drop it")
  if not _ATTACKS.value:
    results = evaluate_checkpoint(_WORKDIR.value, which, overrides)
    print(json.dumps(results, indent=2))
    with open(os.path.join(_WORKDIR.value, f"eval_{which}.json"), "w") as f:
      json.dump(results, f, indent=2)
    return

  for name in _ATTACKS.value:
    robustness.parse_attack(name)  # Reject a bad name before the restore.
  eps_values = _parse_eps(_EPS.value)
  run, state, step, config = restore_for_eval(_WORKDIR.value, which, overrides)
  if run.task != "classification" or not hasattr(run.dataset, "test_images"):
    raise ValueError(
        f"attacks need an image classifier, but {_WORKDIR.value} contains a {run.task} run on "
        f"{run.dataset.name}; drop --attacks to evaluate it on its test split"
    )
  images, labels = robustness.fixed_subset(
      run.dataset.test_images, run.dataset.test_labels, _NUM_EXAMPLES.value
  )
  report = robustness.evaluate_robustness(
      run.model,
      run.launcher,
      state,
      images,
      labels,
      attack_names=_ATTACKS.value,
      eps_values=eps_values,
      global_batch_size=run.eval_batch_size,
      norm=_NORM.value,
      step_size_ratio=_STEP_SIZE_RATIO.value,
      seed=_SEED.value,
      eval_flip=bool(config.get("eval_flip", False)),
  )
  report.update(checkpoint=which, step=step, model=config.model.name, dataset=run.dataset.name)
  json_path, plot_path = robustness.write_report(report, _WORKDIR.value, f"robustness_{which}")
  print(json.dumps(report, indent=2))
  print(f"Wrote {json_path} and {plot_path}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  logs.show_own_info_only()
  app.run(main, flags_parser=cli.parse_flags)
