"""Search hyperparameters of any config: grid, random, or Optuna's adaptive TPE.

  python scripts/sweep.py --config jaxbase/configs/cifar10_folder_resnet20.py \
      --sweep_dir runs/sweeps/resnet20_lr_wd --method random --trials 8 \
      --param optim.lr=log:0.02:0.5 --param optim.weight_decay=log:1e-5:1e-3 \
      --config.data.num_train_examples=5000 --config.num_epochs=3

--param takes KEY=a,b,c (listed values; the only form --method grid accepts),
KEY=log:LOW:HIGH, KEY=uniform:LOW:HIGH or KEY=int:LOW:HIGH. --prune stops a
trial whose eval top-1 falls below the median of earlier trials at the same
epoch. The study is stored in SWEEP_DIR/study.db: rerunning the same command
after an interruption keeps the finished trials and resumes the cut one from
its checkpoint. At the end it writes SWEEP_DIR/trials.csv, trials.md (a
Markdown table) and best_over_trials.png, and prints the best values. An
input error ends with a one-line message and exit status 1; --traceback shows
where it was raised.
"""

import json

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.
hostdevices.keep_freed_memory()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxbase import cli, environment, logs, sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to the base config file (jaxbase/configs/).", lock_config=True
)
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Folder of the study and its trials.")
_PARAMS = flags.DEFINE_multi_string("param", [], "A searched config key; see the module doc.")
_METHOD = flags.DEFINE_enum("method", "random", list(sweep.METHODS), "Search method.")
_TRIALS = flags.DEFINE_integer("trials", 8, "Finished trials to reach (a grid stops at its size).")
_PRUNE = flags.DEFINE_bool("prune", False, "Stop trials below the median of earlier ones.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampler.")
_METRIC = flags.DEFINE_enum(
    "metric",
    "eval_accuracy",
    ["eval_accuracy", "best_eval_accuracy"],
    "Score of a trial: final eval top-1, or the best during training.",
)


@cli.report_input_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  parameters = [sweep.parse_parameter(p) for p in _PARAMS.value]
  definition = sweep.Sweep(
      base_config=_CONFIG.value,
      parameters=parameters,
      method=_METHOD.value,
      num_trials=_TRIALS.value,
      prune=_PRUNE.value,
      seed=_SEED.value,
      metric=_METRIC.value,
  )
  environment.enable_compilation_cache()
  study = sweep.run_sweep(definition, _SWEEP_DIR.value)
  paths = sweep.write_results(study, _SWEEP_DIR.value)
  print(open(paths[1]).read())
  best = study.best_trial
  print(f"best: trial {best.number}, score {best.value:.4f}, values {json.dumps(best.params)}")
  print("wrote " + ", ".join(paths))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "sweep_dir"])
  logs.show_own_info_only()
  app.run(main, flags_parser=cli.parse_flags)
