"""Train and evaluate a model from a config file.

  python scripts/train.py --config jaxbase/configs/digits_resnet.py --workdir runs/digits \
      [--config.optim.lr=0.05 ...]

Running again with the same --workdir resumes from its newest intact checkpoint.
At the end, WORKDIR/results.json contains the test accuracy and the run's facts.
SIGTERM or Ctrl-C saves a checkpoint and exits with 143 or 130. Invalid input (a
config value, a data file, a damaged or mismatched checkpoint, a non-finite loss)
ends the run with a one-paragraph error and exit status 1; --traceback shows
where it was raised.
"""

import json
import sys

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxbase import logs  # noqa: E402
from jaxbase.train import train_and_evaluate  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (jaxbase/configs/).", lock_config=True
)
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of input errors instead of only their message."
)

# Errors that describe bad input and name the fix, so a traceback adds nothing for the user.
_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except _INPUT_ERRORS as error:
    if _TRACEBACK.value:
      raise
    logging.error("%s: %s", type(error).__name__, error)
    sys.exit(1)
  print(json.dumps(results, indent=2))
  if results.get("interrupted"):
    # 128 + signal number is the shell convention for "stopped by a signal".
    sys.exit(143 if results["interrupted"] == "SIGTERM" else 130)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  logs.show_own_info_only()
  app.run(main)
