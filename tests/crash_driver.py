"""Runs a tiny training in a subprocess and kills it with SIGKILL at a chosen moment.

  python tests/crash_driver.py WORKDIR FAULT

FAULT is one of:
  none        train to the end.
  step:K      wait until pending checkpoint saves are on disk, then SIGKILL
              before step K runs (between steps).
  commit:K    SIGKILL while saving the checkpoint of step K, after its files
              are written but before orbax renames the temporary directory.
  inflight:K  SIGKILL right after the save of step K was started, while orbax
              writes it in the background.

Used by tests/test_loop.py; `config()` is the run both sides compare.
"""

import os
import signal
import sys

from jaxbase.configs import digits_resnet


def config():
  config = digits_resnet.get_config()
  config.model.name = "cnn_small"
  config.num_epochs = 1
  config.batch_size = 64
  config.eval_batch_size = 120
  config.log_every_steps = 5
  config.checkpoint.every_steps = 4
  config.checkpoint.keep = 3
  return config


def _kill():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def install_fault(fault: str) -> None:
  from jaxbase import checkpoint as checkpoint_lib
  from jaxbase.train import parallel
  from orbax.checkpoint._src.path import atomicity

  kind, _, value = fault.partition(":")
  if kind == "none":
    return
  target = int(value)
  checkpointers = []
  original_init = checkpoint_lib.Checkpointer.__init__

  def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    checkpointers.append(self)

  checkpoint_lib.Checkpointer.__init__ = init

  if kind == "step":
    original_compile = parallel.DataParallel.compile_train_step

    def compile_train_step(self, train_step):
      compiled = original_compile(self, train_step)
      calls = []

      def counted(state, batch):
        calls.append(None)
        if len(calls) + start_step[0] == target:
          for checkpointer in checkpointers:
            checkpointer.wait()
          _kill()
        return compiled(state, batch)

      return counted

    # The loop compiles after restoring, so the first call after a resume is
    # step restored + 1; read the restored step from the newest checkpoint.
    start_step = [0]
    original_restore = checkpoint_lib.Checkpointer.restore_latest_usable

    def restore_latest_usable(self, *args, **kwargs):
      resumed = original_restore(self, *args, **kwargs)
      if resumed is not None:
        start_step[0] = resumed[2]
      return resumed

    checkpoint_lib.Checkpointer.restore_latest_usable = restore_latest_usable
    parallel.DataParallel.compile_train_step = compile_train_step
  elif kind == "commit":
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
      final = str(self._final_path)
      if os.path.basename(final) == str(target) and checkpoint_lib.LATEST_DIR in final:
        _kill()
      return await original_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
  elif kind == "inflight":
    original_save = checkpoint_lib.Checkpointer.save

    def save(self, step, *args, **kwargs):
      saved = original_save(self, step, *args, **kwargs)
      if step == target:
        _kill()
      return saved

    checkpoint_lib.Checkpointer.save = save
  else:
    raise ValueError(f"unknown fault {fault!r}")


def main():
  workdir, fault = sys.argv[1:]
  from jaxbase import logs
  from jaxbase.train import train_and_evaluate

  logs.show_own_info_only()
  install_fault(fault)
  results = train_and_evaluate(config(), workdir)
  print("finished at step", results["steps"])


if __name__ == "__main__":
  main()
