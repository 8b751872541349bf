"""Robust accuracy of a trained model over the whole test set, for several attacks and eps.

Attack names:
- 'fgsm': one signed-gradient step of size eps from the clean image.
- 'pgdK' (e.g. 'pgd20'): K steps from a random start, step size
  `step_size_ratio * eps` (default 0.25, i.e. 2/255 at eps 8/255).
- 'pgdKxR' (e.g. 'pgd50x10'): the same with R random restarts, keeping per
  example the strongest result. 'pgd50x10' is the standard strong check.

Every example is attacked once per (attack, eps); padding examples in the last
batch are masked out, so accuracies are exact fractions of the test set.
"""

import dataclasses
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbase import attacks, data as data_lib, losses
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import TrainState
from jaxbase.train.steps import AXIS, flip_averaged_logits, to_float_images

STRONG_ATTACK = "pgd50x10"
_PGD_NAME = re.compile(r"^pgd(\d+)(?:x(\d+))?$")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """An attack by name: its steps, restarts and whether it starts at random."""

  name: str
  num_steps: int
  restarts: int
  random_init: bool


def parse_attack(name: str) -> AttackSpec:
  """Parses 'fgsm', 'pgdK' or 'pgdKxR' into an AttackSpec.

  Raises:
    ValueError: on any other name.
  """
  if name == "fgsm":
    return AttackSpec(name, num_steps=1, restarts=1, random_init=False)
  match = _PGD_NAME.match(name)
  if match is None or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
    raise ValueError(
        f"unknown attack {name!r}; use 'fgsm', 'pgdK' (K steps, e.g. pgd20) or 'pgdKxR' "
        f"(K steps, R restarts, e.g. {STRONG_ATTACK})"
    )
  return AttackSpec(
      name, num_steps=int(match.group(1)), restarts=int(match.group(2) or 1), random_init=True
  )


def make_robust_eval_step(
    model: nn.Module, spec: AttackSpec, norm: str = "linf", eval_flip: bool = False
):
  """Builds `step(state, batch, key, eps, step_size) -> sums` for one replica.

  The model runs in eval mode. `eps` and `step_size` are traced scalars, so one
  compilation serves every eps. Sums: `clean_sum`, `robust_sum` (correct
  predictions on clean and attacked images) and `count`, over real examples
  and all replicas. With `eval_flip` the classifier is
  `steps.flip_averaged_logits` of the model, and the attack takes its
  gradients through both the image and its mirror image.
  """

  def robust_eval_step(state: TrainState, batch: dict, key, eps, step_size) -> dict:
    images = to_float_images(batch["images"])
    labels, mask = batch["labels"], batch["mask"]
    logits_fn = attacks.make_logits_fn(model, state.eval_variables())
    if eval_flip:
      logits_fn = functools.partial(flip_averaged_logits, logits_fn)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    if spec.name == "fgsm":
      adversarial = attacks.fgsm(logits_fn, images, labels, eps=eps, norm=norm)
    else:
      adversarial = attacks.pgd(
          logits_fn,
          images,
          labels,
          key,
          eps=eps,
          step_size=step_size,
          num_steps=spec.num_steps,
          norm=norm,
          restarts=spec.restarts,
      )
    sums = {
        "clean_sum": jnp.sum(losses.topk_correct(logits_fn(images), labels, 1) * mask),
        "robust_sum": jnp.sum(losses.topk_correct(logits_fn(adversarial), labels, 1) * mask),
        "count": jnp.sum(mask),
    }
    return jax.lax.psum(sums, AXIS)

  return robust_eval_step


def fixed_subset(
    images: np.ndarray, labels: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """Returns `count` test examples drawn at random with a fixed seed (all of them for 0).

  Every call with the same `count` picks the same examples, so two checkpoints
  are attacked on the same images. The examples keep the split's order.
  """
  if count < 0:
    raise ValueError(f"the number of examples must be >= 0 (0 keeps all), got {count}")
  if count == 0 or count >= len(labels):
    return images, labels
  index = np.sort(np.random.default_rng(0).permutation(len(labels))[:count])
  return images[index], labels[index]


def evaluate_robustness(
    model: nn.Module,
    launcher: DataParallel,
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    attack_names: Sequence[str],
    eps_values: Sequence[float],
    global_batch_size: int,
    norm: str = "linf",
    step_size_ratio: float = 0.25,
    seed: int = 0,
    eval_flip: bool = False,
) -> dict[str, Any]:
  """Measures clean and robust top-1 accuracy for every attack and eps.

  Args:
    model: the flax module.
    launcher: the data-parallel launcher the state is placed with.
    state: the (replicated) trained state.
    images: uint8 or float [n, height, width, channels] test images.
    labels: int [n].
    attack_names: names for `parse_attack`.
    eps_values: radii in pixel units; 0 gives the clean accuracy.
    global_batch_size: eval batch size over all devices.
    norm: 'linf' or 'l2'.
    step_size_ratio: PGD step size as a fraction of eps.
    seed: seed of the random starts.
    eval_flip: classify, and attack, by the mean of the logits of each image
      and its mirror image, as the run's evaluation does with `eval_flip`.

  Returns:
    `{"clean_accuracy", "examples", "norm", "eval_flip", "results":
    [{"attack", "eps", "step_size", "robust_accuracy"}, ...]}`.
  """
  specs = [parse_attack(name) for name in attack_names]
  for eps in eps_values:
    attacks.check_attack_args(
        eps=eps, step_size=eps * step_size_ratio, norm=norm, num_steps=1, restarts=1
    )
  results, clean_accuracy, examples = [], None, None
  for spec in specs:
    step = launcher.compile_eval_step(
        make_robust_eval_step(model, spec, norm, eval_flip), num_shared_args=3
    )
    for eps in eps_values:
      totals: dict[str, float] = {}
      batches = data_lib.eval_batches(
          images,
          labels,
          global_batch_size=global_batch_size,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
      )
      for index, batch in enumerate(batches):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        sums = step(
            state,
            launcher.shard_batch(batch),
            key,
            jnp.float32(eps),
            jnp.float32(eps * step_size_ratio),
        )
        for name, value in jax.device_get(sums).items():
          totals[name] = totals.get(name, 0.0) + float(value)
      examples = int(round(totals["count"]))
      clean_accuracy = totals["clean_sum"] / totals["count"]
      results.append(
          {
              "attack": spec.name,
              "eps": float(eps),
              "step_size": float(eps * step_size_ratio) if spec.name != "fgsm" else float(eps),
              "robust_accuracy": totals["robust_sum"] / totals["count"],
          }
      )
  return {
      "clean_accuracy": clean_accuracy,
      "examples": examples,
      "norm": norm,
      "eval_flip": eval_flip,
      "results": results,
  }


def plot_robustness(report: dict[str, Any], path: str) -> str:
  """Plots robust accuracy against eps, one line per attack, into a PNG at `path`."""
  import matplotlib  # Imported here so that importing jaxbase does not pull in matplotlib.

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for attack in dict.fromkeys(r["attack"] for r in report["results"]):
    points = sorted(
        (r["eps"], r["robust_accuracy"]) for r in report["results"] if r["attack"] == attack
    )
    ax.plot([p[0] * 255 for p in points], [p[1] for p in points], marker="o", label=attack)
  ax.axhline(report["clean_accuracy"], color="gray", linestyle="--", label="clean")
  ax.set(
      xlabel=f"eps ({report['norm']}, x/255)",
      ylabel="top-1 accuracy",
      ylim=(0, 1),
      title="robust accuracy",
  )
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def write_report(report: dict[str, Any], workdir: str, stem: str = "robustness") -> tuple[str, str]:
  """Writes `{stem}.json` and `{stem}.png` into `workdir`; returns both paths."""
  json_path = os.path.join(workdir, f"{stem}.json")
  with open(json_path, "w") as f:
    json.dump(report, f, indent=2)
  return json_path, plot_robustness(report, os.path.join(workdir, f"{stem}.png"))
