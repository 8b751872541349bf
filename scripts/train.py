"""Train and evaluate a model from a config file.

  python scripts/train.py --config jaxbase/configs/digits_resnet.py --workdir runs/digits \
      [--config.optim.lr=0.05 ...]

Running again with the same --workdir resumes from its newest intact checkpoint.
At the end, WORKDIR/results.json contains the test accuracy and the run's facts.
SIGTERM or Ctrl-C saves a checkpoint and exits with 143 or 130. Invalid input (a
config value, a data file, a damaged or mismatched checkpoint, a non-finite loss)
ends the run with a one-paragraph error and exit status 1; --traceback shows
where it was raised.

Multi-process runs start the same command in every process, with a --workdir
that all of them can read and write (a shared file system). On Cloud TPU VMs and
SLURM, add --distributed and JAX reads the cluster's settings; elsewhere name
process 0's address, the process count and each process's id:

  python scripts/train.py ... --coordinator_address=10.0.0.2:8476 --num_processes=2 --process_id=0
  python scripts/train.py ... --coordinator_address=10.0.0.2:8476 --num_processes=2 --process_id=1

Only process 0 logs, prints the results and writes config.json, metrics and
plots; every process takes part in saving and restoring checkpoints.
"""

import json
import sys

from jaxbase import hostdevices

hostdevices.use_cpu_cores_as_devices()  # Before jax is imported.
hostdevices.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxbase import cli, distributed, logs  # noqa: E402
from jaxbase.train import train_and_evaluate  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (jaxbase/configs/).", lock_config=True
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port where process 0 of a multi-process run listens "
    f"(default ${distributed.ENV_COORDINATOR_ADDRESS}).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, f"Processes in the run (default ${distributed.ENV_NUM_PROCESSES})."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    f"This process's index, 0 to num_processes - 1 (default ${distributed.ENV_PROCESS_ID}).",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run configured by the cluster (Cloud TPU VMs, SLURM, Open MPI) "
    f"through jax.distributed.initialize() (default ${distributed.ENV_DISTRIBUTED}=auto).",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout",
    None,
    "Seconds to wait for the coordinator and the other processes "
    f"(default ${distributed.ENV_INIT_TIMEOUT} or {distributed.DEFAULT_TIMEOUT_SECONDS}).",
)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices",
    0,
    "Global device count the run expects; it stops before training when JAX finds another "
    "count. 0 accepts any count.",
)


@cli.report_input_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  settings = distributed.resolve(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      timeout_seconds=_INIT_TIMEOUT.value,
      auto=_DISTRIBUTED.value,
  )
  distributed.initialize(settings)
  distributed.check_devices(_NUM_DEVICES.value)
  is_main = jax.process_index() == 0
  if not is_main:
    logging.set_verbosity(logging.WARNING)  # One copy of the INFO log, from process 0.

  results = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if is_main:
    print(json.dumps(results, indent=2))
  if results.get("interrupted"):
    # 128 + signal number is the shell convention for "stopped by a signal".
    sys.exit(143 if results["interrupted"] == "SIGTERM" else 130)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  logs.show_own_info_only()
  app.run(main, flags_parser=cli.parse_flags)
