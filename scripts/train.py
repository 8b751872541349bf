"""Train and evaluate a model from a config file.

  python scripts/train.py --config jaxbase/configs/digits_resnet.py --workdir runs/digits \
      [--config.optim.lr=0.05 ...]

Running again with the same --workdir resumes from its newest checkpoint. At the
end, WORKDIR/results.json contains the test accuracy and the run's facts. SIGTERM
or Ctrl-C saves a checkpoint and exits with 143 or 130.
"""

import json
import sys

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxbase import logs  # noqa: E402
from jaxbase.train import train_and_evaluate  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (jaxbase/configs/).", lock_config=True
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(json.dumps(results, indent=2))
  if results.get("interrupted"):
    # 128 + signal number is the shell convention for "stopped by a signal".
    sys.exit(143 if results["interrupted"] == "SIGTERM" else 130)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  logs.show_own_info_only()
  app.run(main)
