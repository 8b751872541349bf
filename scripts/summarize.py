"""Print finished runs as a Markdown table, with the environment they ran in.

  python scripts/summarize.py runs/digits runs/cifar10_folder_resnet20

Reads WORKDIR/results.json (and WORKDIR/robustness_latest.json when present)
of each run. The environment line is read from this machine, so run it where
the runs ran.
"""

import json
import os
import sys

from jaxbase import environment


def _eps(eps: float) -> str:
  """Radii that are whole multiples of 1/255 as 8/255, others as decimals."""
  steps = eps * 255
  return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-4 else f"{eps:.4g}"


def row(workdir: str) -> str:
  """Formats one run's results.json as a Markdown table row."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  if results.get("interrupted"):
    raise SystemExit(f"{workdir} was interrupted at step {results['steps']}; resume it first")
  robust = ""
  robustness_path = os.path.join(workdir, "robustness_latest.json")
  if os.path.exists(robustness_path):
    with open(robustness_path) as f:
      report = json.load(f)
    robust = "; ".join(
        f"{r['attack']} eps {_eps(r['eps'])}: {r['robust_accuracy']:.2%}"
        for r in report["results"]
        if r["eps"] > 0
    )
    if robust and report["examples"] < results["eval_examples"]:
      robust += f" ({report['examples']:,} images; clean {report['clean_accuracy']:.2%})"
  minutes = results["train_seconds"] / 60
  # With 5 classes or fewer every prediction is in the top 5; MLM ranks the vocabulary.
  top5_applies = results.get("task") == "mlm" or results.get("num_classes", 6) > 5
  top5 = f"{results['eval_top5']:.2%}" if top5_applies else "-"
  return (
      f"| {results['model']} | {results['dataset']} | {results['epochs']} | "
      f"{results['eval_accuracy']:.2%} | {top5} | "
      f"{results['best_eval_accuracy']:.2%} | {robust or '-'} | {minutes:.1f} min | "
      f"{results['devices']} | {results['eval_examples']:,} |"
  )


def main(workdirs: list[str]) -> None:
  if not workdirs:
    raise SystemExit(__doc__)
  print(
      "| model | data | epochs | test top-1 | test top-5 | best top-1 | robust top-1 | "
      "train time | devices | test examples |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for workdir in workdirs:
    print(row(workdir))
  print()
  print(f"Environment: {environment.describe()}.")


if __name__ == "__main__":
  main(sys.argv[1:])
