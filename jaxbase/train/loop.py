"""The training loop: `train_and_evaluate(config, workdir)`.

It reads top to bottom in stages: work directory, data, model and optimizer,
devices, checkpoint, loop, final evaluation.
"""

import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from jaxbase import checkpoint as checkpoint_lib
from jaxbase import data as data_lib
from jaxbase import models, optim, transfer
from jaxbase.configs import default as default_config
from jaxbase.data import augment as augment_lib
from jaxbase.data import subset
from jaxbase.data import trivial_augment
from jaxbase.kernels import conv as kernel_conv
from jaxbase.train import adversarial as adversarial_lib
from jaxbase.train import config_check
from jaxbase.train import nonfinite
from jaxbase.train import run_data as run_data_lib
from jaxbase.train import steps as steps_lib
from jaxbase.train import writer as writer_lib
from jaxbase.train.parallel import DataParallel
from jaxbase.train.state import TrainState, create_train_state

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"


class StopRequest:
  """Turns SIGTERM and SIGINT into a flag that the loop checks after each step.

  The loop then saves a checkpoint and returns, so a preempted or interrupted
  run loses no finished step. Further signals are logged and ignored, so a
  second Ctrl-C cannot cut the save short; SIGKILL still stops the process.

  In a run of several processes a signal often reaches only some of them, and a
  process that stopped alone would leave the others waiting in a collective. So
  the processes decide together, at steps they all reach (see `decide`): when
  any of them has received a signal, all save the same step and stop, and all
  report the strongest signal (SIGTERM over SIGINT).
  """

  # Signals by strength for the decision across processes; index 0 is no signal.
  _BY_STRENGTH = (None, "SIGINT", "SIGTERM")

  def __init__(self):
    self.signal_name: str | None = None  # The signal this process received.
    self.decided: str | None = None  # The signal the run stops for, once decided.
    self._previous = {}

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    if self.signal_name is not None:
      logging.warning(
          "Received %s while stopping; still saving the checkpoint (SIGKILL stops at once, "
          "and the previous complete checkpoint stays usable).",
          signal.Signals(signum).name,
      )
      return
    self.signal_name = signal.Signals(signum).name
    logging.warning(
        "Received %s: saving a checkpoint after this step, then stopping.", self.signal_name
    )

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def decide(self, shared_step: bool) -> bool:
    """Returns whether to stop after the current step, the same value on every process.

    A single process decides from its own flag after every step. Several
    processes exchange their flags only where `shared_step` is true, which must
    be the same steps on all of them, and go on elsewhere. The decision uses
    the exchanged values alone, so a signal that arrives during the exchange
    waits for the next shared step on every process alike.
    """
    if jax.process_count() == 1:
      self.decided = self.signal_name
    elif shared_step and self.decided is None:
      code = self._BY_STRENGTH.index(self.signal_name)
      codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
      self.decided = self._BY_STRENGTH[int(codes.max())]
      if self.decided is not None and self.signal_name is None:
        logging.warning(
            "Process %d received %s: every process saves a checkpoint after this step, "
            "then stops.",
            int(codes.argmax()),
            self.decided,
        )
    return self.decided is not None


def build_augment(config: ml_collections.ConfigDict) -> steps_lib.AugmentFn | None:
  """Builds the per-image augmentation from `config.augment`.

  In order: TrivialAugment (`trivial_augment`), random crop (`crop_padding`),
  horizontal flip (`flip`), then cutout (`cutout`), each with its own key.
  """
  padding = int(config.get("crop_padding", 0))
  flip = bool(config.get("flip", False))
  cutout = int(config.get("cutout", 0))
  trivial = bool(config.get("trivial_augment", False))
  for name, value in (("crop_padding", padding), ("cutout", cutout)):
    if value < 0:
      raise ValueError(f"augment.{name} must be >= 0, got {value}")
  if not (padding or flip or cutout or trivial):
    return None

  def augment(key, images):
    trivial_key, crop_key, flip_key, cutout_key = jax.random.split(key, 4)
    if trivial:
      images = trivial_augment.trivial_augment(trivial_key, images)
    if padding:
      images = augment_lib.random_crop(crop_key, images, padding)
    if flip:
      images = augment_lib.random_flip(flip_key, images)
    if cutout:
      images = augment_lib.cutout(cutout_key, images, cutout)
    return images

  return augment


def build_mix(config: ml_collections.ConfigDict, num_classes: int) -> steps_lib.MixFn | None:
  """Builds mixup or cutmix from `config.augment` (`mixup_alpha`, `cutmix_alpha`), or None."""
  mixup_alpha = float(config.get("mixup_alpha", 0.0))
  cutmix_alpha = float(config.get("cutmix_alpha", 0.0))
  for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if value < 0:
      raise ValueError(f"augment.{name} must be >= 0 (0 turns it off), got {value}")
  if mixup_alpha and cutmix_alpha:
    raise ValueError(
        f"augment.mixup_alpha={mixup_alpha} and augment.cutmix_alpha={cutmix_alpha} are both "
        "on; set one of them to 0"
    )
  if mixup_alpha:
    return functools.partial(augment_lib.mixup, num_classes=num_classes, alpha=mixup_alpha)
  if cutmix_alpha:
    return functools.partial(augment_lib.cutmix, num_classes=num_classes, alpha=cutmix_alpha)
  return None


def evaluate(
    eval_step,
    launcher: DataParallel,
    state: TrainState,
    arrays: dict[str, np.ndarray],
    global_batch_size: int,
    trim: data_lib.SequenceTrim | None = None,
) -> dict[str, float]:
  """Evaluates `state` on every example of `arrays` once; returns loss, accuracy, top5, examples.

  For the 'mlm' task the means are over masked tokens, and `examples` counts
  those tokens. `trim` cuts text batches to their longest sentence.
  """
  totals: dict[str, float] = {}
  for batch in data_lib.pipeline.eval_batches_from_arrays(
      arrays,
      global_batch_size=global_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      trim=trim,
  ):
    sums = jax.device_get(eval_step(state, launcher.shard_batch(batch)))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value)
  return steps_lib.summarize_eval(totals)


def checkpoint_meta(
    config: ml_collections.ConfigDict,
    state: TrainState,
    *,
    dataset_name: str,
    steps_per_epoch: int,
    train_seconds: float,
    skipped_steps: int = 0,
    tokenizer_json: str | None = None,
) -> dict[str, Any]:
  """Builds the JSON item of a checkpoint: config, names, parameter shapes and data position.

  Text runs also store their tokenizer, so that evaluation and fine-tuning
  read the vocabulary the parameters were trained with.
  """
  step = int(state.step)
  meta = {
      "config": config.to_dict(),
      "model": config.model.name,
      "dataset": dataset_name,
      "param_shapes": checkpoint_lib.param_shapes(state.params),
      "data_position": {
          "epoch": step // steps_per_epoch,
          "batch": step % steps_per_epoch,
          "steps_per_epoch": steps_per_epoch,
      },
      "train_seconds": train_seconds,
      "skipped_steps": skipped_steps,
  }
  if tokenizer_json is not None:
    meta["tokenizer"] = tokenizer_json
  return meta


def _format_summary(
    epoch: int,
    num_epochs: int,
    train: dict,
    evaluation: dict | None,
    examples_per_second: float,
    seconds: float,
    unit: str = "img",
) -> str:
  line = (
      f"epoch {epoch}/{num_epochs}  train loss {train['loss']:.4f} top-1 {train['top1']:.2%}  "
      f"lr {train['learning_rate']:.4g}"
  )
  if evaluation is not None:
    line += f"  eval loss {evaluation['loss']:.4f} top-1 {evaluation['accuracy']:.2%}"
  return line + f"  {examples_per_second:,.0f} {unit}/s  {seconds:,.0f} s"


def write_json(path: str, value: Any) -> None:
  """Writes JSON to a temporary file and renames it, so a killed process never leaves half a file."""
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(temporary, path)


def read_results(path: str) -> dict[str, Any] | None:
  """Returns the results of a finished run, or None when the file is missing or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      results = json.load(f)
  except (OSError, ValueError) as error:
    logging.warning(
        "Ignoring unreadable %s (%s); evaluating the final checkpoint again.", path, error
    )
    return None
  return results if isinstance(results, dict) else None


@dataclasses.dataclass
class Run:
  """Data, devices, model, optimizer and initial state, built from a config before training."""

  data: run_data_lib.RunData
  task: str
  launcher: DataParallel
  model: Any
  optimizer: Any
  schedule: Any  # Learning rate as a function of the train step.
  state: TrainState  # Initial state, already placed by the launcher.
  num_params: int
  batch_size: int
  eval_batch_size: int
  steps_per_epoch: int
  num_epochs: int

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch

  @property
  def dataset(self):
    """The loaded data set: an `ImageDataset`, or a `TokenizedDataset` for text."""
    return self.data.dataset

  def make_steps(self, config: ml_collections.ConfigDict):
    """Build the per-replica train and eval steps of the run's task."""
    if self.task == "mlm":
      masking = run_data_lib.mlm_masking(config, self.data.tokenizer, self.dataset.max_length)
      return (
          steps_lib.make_mlm_train_step(
              self.model, self.optimizer, masking=masking, schedule=self.schedule
          ),
          steps_lib.make_mlm_eval_step(self.model),
      )
    train_step = steps_lib.make_train_step(
        self.model,
        self.optimizer,
        schedule=self.schedule,
        label_smoothing=float(config.get("loss", {}).get("label_smoothing", 0.0)),
        augment=build_augment(config.get("augment", ml_collections.ConfigDict())),
        adversarial=config.get("adversarial"),
        steps_per_epoch=self.steps_per_epoch,
        mix=build_mix(config.get("augment", ml_collections.ConfigDict()), self.data.num_classes),
        ema_decay=float(config.get("ema", {}).get("decay", 0.0)),
        token_augment=self._token_augment(config),
    )
    eval_step = steps_lib.make_eval_step(self.model, eval_flip=bool(config.get("eval_flip", False)))
    return train_step, eval_step

  def _token_augment(self, config: ml_collections.ConfigDict) -> steps_lib.TokenAugmentFn | None:
    """Token dropout from `augment.token_dropout`, or None when it is 0."""
    rate = float(config.get("augment", {}).get("token_dropout", 0.0))
    if not rate:
      return None
    tokenizer = self.data.tokenizer
    return functools.partial(
        augment_lib.token_dropout,
        rate=rate,
        replace_id=tokenizer.mask_id,
        num_special=tokenizer.num_special,
    )


def check_resumable(meta: dict[str, Any], config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises CheckpointMismatchError if `config` would not continue the checkpointed run.

  Only the keys in `checkpoint.RESUMABLE_KEYS` (logging, checkpointing, eval
  batching, device layout, file locations) may change; any other change, such
  as the schedule length or the batch size, would silently turn the resumed run
  into a different experiment.
  """
  differences = checkpoint_lib.config_differences(
      meta.get("config", {}), config.to_dict(), default_config.get_config().to_dict()
  )
  if differences:
    saved_model = meta.get("config", {}).get("model", {}).get("name", "?")
    raise checkpoint_lib.CheckpointMismatchError(
        f"the checkpoint in {workdir} was written by model {saved_model!r} with a different "
        "config, so this run cannot resume it:\n  "
        + "\n  ".join(differences)
        + "\nUse a new --workdir, or rerun with the config that wrote the checkpoint (its values "
        + f"are listed in {os.path.join(workdir, CONFIG_FILE)}). "
        "The checkpoint was left as it is."
    )


def setup_run(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    saved_meta: dict[str, Any] | None = None,
    load_pretrained: bool = False,
) -> Run:
  """Builds data, devices, model, optimizer and the initial state from `config`.

  Args:
    config: the run config.
    workdir: the work directory; text runs keep `tokenizer.json` there.
    saved_meta: the metadata of the run's own checkpoint, whose tokenizer a
      resumed or evaluated text run uses.
    load_pretrained: start the parameters from `init.checkpoint` (fresh
      fine-tuning runs), with the head freshly initialized.
  """
  config_check.check_config(config)
  batch_size = int(config.batch_size)
  eval_batch_size = int(config.get("eval_batch_size", batch_size))
  num_epochs = int(config.num_epochs)
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")

  if config.get("adversarial") is not None:
    adversarial_lib.check_config(config.adversarial)
  # Check the augmentation settings before any data is loaded.
  augment_config = config.get("augment", ml_collections.ConfigDict())
  build_augment(augment_config)
  mixing = build_mix(augment_config, num_classes=2) is not None
  method = config.get("adversarial", {}).get("method", "none")
  if mixing and method != "none":
    raise ValueError(
        f"augment.mixup_alpha/cutmix_alpha give soft targets, but adversarial.method={method!r} "
        "crafts attacks against hard labels; set the alpha to 0 or adversarial.method='none'"
    )

  model_name = config.get("model", {}).get("name")
  if config.get("eval_flip") and model_name in models.BERT_MODELS:
    raise ValueError(
        "eval_flip=True averages the logits of each image and its mirror image, but "
        f"{model_name} is a text model; set eval_flip=False"
    )

  # Devices: a step over N devices equals a one-device step on the global batch.
  launcher = DataParallel(config.get("parallel", "shard_map"))
  launcher.check_batch_size(batch_size, "batch_size")
  launcher.check_batch_size(eval_batch_size, "eval_batch_size")

  # Data: the whole data set in host memory, validated once; text is tokenized.
  task = config.get("task", "classification")
  data = run_data_lib.prepare_data(
      config,
      workdir,
      saved_tokenizer=(saved_meta or {}).get("tokenizer"),
      load_pretrained=load_pretrained,
  )
  steps_per_epoch = data_lib.steps_per_epoch(len(data.train_arrays["labels"]), batch_size)

  # Model and optimizer. The optimizer gets the parameter structure because
  # freezing and layer-wise decay label parameters by their names. The schedule
  # counts optimizer updates, which are fewer than train steps under gradient
  # accumulation.
  model = models.build_model(config.model, data.num_classes, vocab_size=data.vocab_size, task=task)
  abstract_params = jax.eval_shape(
      lambda: create_train_state(model, optax.identity(), data.example_inputs, 0).params
  )
  updates_per_epoch = optim.updates_per_epoch(config.optim, steps_per_epoch)
  optimizer, schedule = optim.build(
      config.optim, updates_per_epoch, num_epochs * updates_per_epoch, params=abstract_params
  )
  schedule = optim.schedule_by_train_step(schedule, optim.accumulation_steps(config.optim))
  # config_check has already checked the range of ema.decay.
  ema_decay = float(config.get("ema", {}).get("decay", 0.0))
  if ema_decay and task == "mlm":
    raise ValueError("ema.decay applies to classification runs; set it to 0 for MLM pretraining")
  token_dropout = float(config.get("augment", {}).get("token_dropout", 0.0))
  if token_dropout and data.tokenizer is None:
    raise ValueError(
        f"augment.token_dropout={token_dropout} applies to text, but {data.dataset.name} is an "
        "image data set; set it to 0"
    )
  if token_dropout and task == "mlm":
    raise ValueError(
        "augment.token_dropout applies to classification; MLM pretraining already masks "
        "tokens (mlm.mask_rate), so set it to 0"
    )
  state = create_train_state(
      model, optimizer, data.example_inputs, int(config.seed), ema=ema_decay > 0
  )
  if data.pretrained is not None:
    params = transfer.load_pretrained(
        state.params,
        data.pretrained,
        resize_position_embed=bool(config.init.get("resize_position_embed", False)),
        has_class_token=(config.model.get("pool") or "token") == "token",
    )
    batch_stats = state.batch_stats
    if batch_stats and data.pretrained_batch_stats:
      # BatchNorm statistics belong to the backbone: a fine-tuned ResNet
      # starts from the running means and variances its weights were trained with.
      batch_stats = transfer.load_pretrained(
          batch_stats, data.pretrained_batch_stats, head_names=()
      )
    ema = None
    if ema_decay:
      # Copies: the compiled step donates the state's buffers, and params and
      # ema sharing one buffer would donate it twice (a crash in XLA).
      ema = jax.tree.map(
          lambda x: jnp.array(x, copy=True), {"params": params, "batch_stats": batch_stats}
      )
    state = state.replace(
        params=params, batch_stats=batch_stats, opt_state=optimizer.init(params), ema=ema
    )
    data.pretrained = data.pretrained_batch_stats = None  # Free the host copies.
    logging.info("Initialized from the pretrained checkpoint in %s", config.init.checkpoint)
  elif config.optim.get("freeze_backbone") and not config.get("init", {}).get("checkpoint"):
    logging.warning(
        "optim.freeze_backbone is set without init.checkpoint: only the head trains, on top of "
        "a randomly initialized backbone. Set init.checkpoint to probe pretrained features."
    )
  num_params = models.count_params(state.params)
  return Run(
      data=data,
      task=task,
      launcher=launcher,
      model=model,
      optimizer=optimizer,
      schedule=schedule,
      state=launcher.replicate(state),
      num_params=num_params,
      batch_size=batch_size,
      eval_batch_size=eval_batch_size,
      steps_per_epoch=steps_per_epoch,
      num_epochs=num_epochs,
  )


def _latest_meta(workdir: str) -> dict[str, Any] | None:
  """Return the metadata of the newest readable checkpoint in `workdir`, or None without one.

  A damaged newest checkpoint is skipped here; the restore below reports it and
  falls back to an earlier one.
  """
  if not os.path.isdir(os.path.join(workdir, checkpoint_lib.LATEST_DIR)):
    return None
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    for step in sorted(checkpointer.all_steps(), reverse=True):
      try:
        return checkpointer.restore_meta(step)
      except checkpoint_lib.DamagedCheckpointError:
        continue
    return None
  finally:
    checkpointer.close()


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    on_eval: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict[str, Any]:
  """Trains the model of `config`, evaluating and checkpointing into `workdir`.

  A work directory that already has a checkpoint is resumed from its newest
  one; the resumed run ends in the same state as an uninterrupted one.

  Args:
    config: the run config (see jaxbase/configs/).
    workdir: where checkpoints, config.json, metrics.jsonl, TensorBoard events,
      curves.png and results.json go.
    on_eval: called as `on_eval(epoch, evaluation)` after every evaluation
      during training; returning True stops the run after a checkpoint, with
      `interrupted: 'pruned'` in the results (used by sweeps).

  Returns:
    The results dict also written to `workdir/results.json`. It has
    `interrupted: True` when a signal stopped the run early; the run then
    saved a checkpoint and can be resumed. A run that completed although a
    signal arrived after its last step returns `received_signal` with the
    signal's name as well (not written to results.json).
  """
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"--workdir {workdir} is a file; pass a directory")
  config_check.check_config(config)  # Before anything is written into the work directory.
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  saved_meta = _latest_meta(workdir)
  if saved_meta is not None:
    check_resumable(saved_meta, config, workdir)
  run = setup_run(config, workdir, saved_meta=saved_meta, load_pretrained=saved_meta is None)
  dataset, launcher, state = run.dataset, run.launcher, run.state
  batch_size, eval_batch_size = run.batch_size, run.eval_batch_size
  steps_per_epoch, total_steps, num_epochs = run.steps_per_epoch, run.total_steps, run.num_epochs
  num_params = run.num_params

  # Checkpoint: resume when the work directory has one.
  every_steps = int(config.checkpoint.get("every_steps", 0)) or (
      int(config.checkpoint.get("every_epochs", 1)) * steps_per_epoch
  )
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, keep=int(config.checkpoint.get("keep", 3)), every_steps=every_steps
  )
  train_seconds_before = 0.0
  skipped_before = 0
  check_meta = functools.partial(check_resumable, config=config, workdir=checkpointer.workdir)
  try:
    latest_step = checkpointer.latest_step()
    finished = read_results(os.path.join(workdir, RESULTS_FILE))
    if latest_step == total_steps and finished is not None:
      try:
        check_meta(checkpointer.restore_meta(latest_step))
      except checkpoint_lib.DamagedCheckpointError:
        pass  # Train again from the newest intact checkpoint below.
      else:
        logging.info(
            "The run in %s is already complete; its results are in %s", workdir, RESULTS_FILE
        )
        checkpointer.close()
        return finished
    resumed = checkpointer.restore_latest_usable(launcher.unreplicate(state), check_meta)
  except Exception:
    checkpointer.close()
    raise
  if resumed is not None:
    restored, meta, resumed_step = resumed
    state = launcher.replicate(restored) if launcher.mode == "pmap" else restored
    train_seconds_before = float(meta.get("train_seconds", 0.0))
    skipped_before = int(meta.get("skipped_steps", 0))
    logging.info("Resuming at step %d of %d from %s", resumed_step, total_steps, workdir)
  elif is_main:
    write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  start_step = int(jax.device_get(launcher.unreplicate(state).step))

  train_step, eval_step = run.make_steps(config)
  train_step = launcher.compile_train_step(train_step)
  eval_step = launcher.compile_eval_step(eval_step)
  run_eval = functools.partial(
      evaluate,
      eval_step,
      launcher,
      arrays=run.data.test_arrays,
      global_batch_size=eval_batch_size,
      trim=run.data.test_trim,
  )
  logging.info(
      "Model %s (task %s): %s parameters; data %s: %s; "
      "%d device(s) (%s), global batch %d, %d steps per epoch, %d epoch(s)",
      config.model.name,
      run.task,
      f"{num_params:,}",
      dataset.name,
      run.data.description,
      launcher.num_devices,
      launcher.mode,
      batch_size,
      steps_per_epoch,
      num_epochs,
  )

  # Loop.
  writer = writer_lib.MetricWriter(workdir, start_step=start_step)
  log_every = max(1, int(config.get("log_every_steps", 50)))
  eval_every_epochs = max(1, int(config.get("eval_every_epochs", 1)))
  monitor = nonfinite.NonFiniteMonitor(
      config.get("on_nonfinite", "raise"),
      nonfinite.flag_names(launcher.unreplicate(state).params),
      steps_per_epoch,
      max_consecutive_skips=int(config.get("max_consecutive_skips", 10)),
      skipped_steps=skipped_before,
  )
  tokenizer = run.data.tokenizer
  make_meta = functools.partial(
      checkpoint_meta,
      config,
      dataset_name=dataset.name,
      steps_per_epoch=steps_per_epoch,
      tokenizer_json=tokenizer.to_json() if tokenizer is not None else None,
  )
  batches = data_lib.pipeline.train_batches_from_arrays(
      run.data.train_arrays,
      global_batch_size=batch_size,
      seed=int(config.seed),
      start_step=start_step,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      trim=run.data.train_trim,
  )
  loop_start = epoch_start = time.time()
  pending: list[dict] = []  # Device metrics of the steps since the last fetch.
  window: list[dict] = []  # Host metrics of the finite steps since the last log line.
  epoch_metrics: list[dict] = []
  window_start, window_steps = time.time(), 0
  evaluation = None
  interrupted = None
  pruned = False
  step = start_step
  progress = tqdm(
      total=total_steps,
      initial=start_step,
      unit="step",
      disable=not is_main or None,
      dynamic_ncols=True,
      desc="train",
  )

  def host_state_and_meta(state, meta_extra=None):
    host_state = launcher.unreplicate(state)
    train_seconds = train_seconds_before + time.time() - loop_start
    meta = make_meta(host_state, train_seconds=train_seconds, skipped_steps=monitor.skipped_steps)
    return host_state, {**meta, **(meta_extra or {})}

  with StopRequest() as stop:
    try:
      while step < total_steps:
        batch = launcher.shard_batch(next(batches))
        state, metrics = train_step(state, batch)
        step += 1
        pending.append(metrics)
        progress.update(1)

        epoch_end = step % steps_per_epoch == 0 or step == total_steps
        log_due = step % log_every == 0 or epoch_end
        periodic = checkpointer.every_steps and step % checkpointer.every_steps == 0
        # Decide once: a signal that arrives later in this iteration is handled in
        # the next one, after its step, so a stop always saves first. Several
        # processes decide together at log and checkpoint steps.
        stopping = stop.decide(shared_step=log_due or bool(periodic))
        save_due = stopping or step == total_steps or periodic
        if log_due or save_due:
          # Between evaluations this fetch is the loop's only device sync. It runs
          # before every log line, evaluation and save, so a non-finite step is
          # caught before any state after it is evaluated or saved.
          fetched = jax.device_get(pending)
          pending = []
          finite = monitor.check(fetched, first_step=step - len(fetched) + 1)
          window.extend(finite)
          epoch_metrics.extend(finite)
          window_steps += len(fetched)

        if log_due:
          elapsed = time.time() - window_start
          scalars = {"train/examples_per_second": window_steps * batch_size / max(elapsed, 1e-9)}
          if monitor.mode == "skip":
            scalars["train/skipped_steps"] = monitor.skipped_steps
          if window:
            means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            scalars.update({f"train/{k}": v for k, v in means.items()})
            progress.set_postfix(loss=f"{means['loss']:.3f}", top1=f"{means['top1']:.3f}")
          writer.write(step, scalars)
          window, window_start, window_steps = [], time.time(), 0

        if epoch_end:
          epoch = -(-step // steps_per_epoch)
          train_means = {
              k: float(np.mean([m[k] for m in epoch_metrics])) if epoch_metrics else float("nan")
              for k in ("loss", "top1", "learning_rate")
          }
          epoch_images = len(epoch_metrics) * batch_size
          epoch_seconds = time.time() - epoch_start
          epoch_metrics = []
          evaluation = None
          if epoch % eval_every_epochs == 0 or step == total_steps:
            evaluation = run_eval(state)
            writer.write(step, {f"eval/{k}": v for k, v in evaluation.items()})
            host_state, meta = host_state_and_meta(state, {"eval": evaluation})
            checkpointer.save_best(step, host_state, meta, evaluation["accuracy"])
            if on_eval is not None and on_eval(epoch, evaluation) and step < total_steps:
              pruned = True
          seconds = time.time() - loop_start
          if is_main:
            progress.write(
                _format_summary(
                    epoch,
                    num_epochs,
                    train_means,
                    evaluation,
                    epoch_images / max(epoch_seconds, 1e-9),
                    seconds,
                    unit="img" if run.data.tokenizer is None else "sent",
                )
            )
          writer.flush()
          epoch_start = time.time()

        if save_due or pruned:
          host_state, meta = host_state_and_meta(state)
          checkpointer.save(step, host_state, meta, force=True)
        if stopping or pruned:
          interrupted = stop.decided if stopping else "pruned"
          break
    except nonfinite.NonFiniteError as error:
      progress.close()
      checkpointer.wait()
      latest = checkpointer.latest_step()
      writer.close()
      checkpointer.close()
      where = (
          f"The latest checkpoint, step {latest} in {workdir}, is intact, and running the same "
          "command again resumes from it."
          if latest is not None
          else "No checkpoint was saved before it."
      )
      raise nonfinite.NonFiniteError(f"{error} {where}") from None

  progress.close()
  checkpointer.wait()
  train_seconds = train_seconds_before + time.time() - loop_start

  # Final evaluation and results.
  if interrupted:
    if interrupted == "pruned":
      logging.info("Stopped early by on_eval at step %d of %d in %s.", step, total_steps, workdir)
    else:
      logging.warning(
          "Stopped by %s at step %d of %d; the checkpoint in %s resumes it.",
          interrupted,
          step,
          total_steps,
          workdir,
      )
    results = {"interrupted": interrupted, "steps": step, "total_steps": total_steps}
  else:
    if evaluation is None:
      evaluation = run_eval(state)
    best_step = checkpointer.best_step()
    best = (
        checkpointer.restore_meta(best_step, "best")["eval"]
        if best_step is not None
        else evaluation
    )
    results = {
        "model": config.model.name,
        "task": run.task,
        "dataset": dataset.name,
        "eval_accuracy": evaluation["accuracy"],
        "eval_top5": evaluation["top5"],
        "num_classes": run.data.num_classes,
        "eval_loss": evaluation["loss"],
        "eval_examples": evaluation["examples"],
        "best_eval_accuracy": best["accuracy"],
        "best_step": best_step if best_step is not None else step,
        "train_seconds": train_seconds,
        "steps": step,
        "epochs": num_epochs,
        "num_params": num_params,
        "devices": launcher.num_devices,
        "processes": jax.process_count(),
        "parallel": launcher.mode,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "conv_kernels": kernel_conv.resolve(
            config.model.get("conv_impl") or "auto",
            models.DTYPES[config.model.get("dtype") or "float32"],
        ),
    }
  if monitor.mode == "skip" or monitor.skipped_steps:
    results["skipped_steps"] = monitor.skipped_steps
  if is_main:
    write_json(os.path.join(workdir, RESULTS_FILE), results)
    writer_lib.plot_curves(workdir)
  writer.close()
  checkpointer.close()
  if not interrupted and stop.requested:
    # The signal came after the last step's stop decision (during the final
    # evaluation or save), so the run is complete. A caller that runs several
    # trainings in a row (sweeps, studies) stops after this one. The key is
    # left out of results.json, so the finished run reads as finished later.
    results = {**results, "received_signal": stop.signal_name}
  return results


def _coerce_like(current: Any, value: Any) -> Any:
  """Converts a command-line string to the type of the config value it replaces."""
  if not isinstance(value, str) or current is None or isinstance(current, str):
    return value
  if isinstance(current, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1")
  return type(current)(value)


def _override(config: ml_collections.ConfigDict, key: str, value: Any, workdir: str) -> None:
  """Sets the dotted `key` of `config` to `value`, converted to the type it replaces.

  A key that the saved config lacks but the default config has (an option
  added after the checkpoint was written, such as `eval_flip`) is added with
  the type of its default.
  """
  *parents, leaf = key.split(".")
  target = config
  default: Any = default_config.get_config()
  for parent in parents:
    target = target.get(parent)
    default = default.get(parent) if isinstance(default, ml_collections.ConfigDict) else None
    if not isinstance(target, ml_collections.ConfigDict):
      break
  if not isinstance(target, ml_collections.ConfigDict):
    raise KeyError(f"unknown config key {key!r}; see config.json in {workdir} for the keys")
  if leaf in target:
    current = target.get(leaf)
  elif isinstance(default, ml_collections.ConfigDict) and leaf in default:
    current = default.get(leaf)
  else:
    raise KeyError(f"unknown config key {key!r}; see config.json in {workdir} for the keys")
  target[leaf] = _coerce_like(current, value)


def restore_for_eval(
    workdir: str, which: str = "latest", config_overrides: dict[str, Any] | None = None
) -> tuple[Run, TrainState, int, ml_collections.ConfigDict]:
  """Rebuilds a run from a checkpoint's own config and restores its state.

  Args:
    workdir: a training work directory.
    which: 'latest' or 'best' (highest eval accuracy during training).
    config_overrides: dotted config keys to replace, e.g. {"data.path": ...}
      when the data moved since training. String values are converted to the
      type of the value they replace.

  Returns:
    `(run, state, step, config)`, the state placed by `run.launcher`.

  Raises:
    FileNotFoundError: when the work directory or the checkpoint is missing.
    KeyError: when an override names a key the config does not have.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"work directory {workdir} does not exist")
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    step = checkpointer.latest_step() if which == "latest" else checkpointer.best_step()
    if step is None:
      raise FileNotFoundError(
          f"no {which} checkpoint in {workdir}; train first with scripts/train.py --workdir {workdir}"
      )
    meta = checkpointer.restore_meta(step, which)
    config = ml_collections.ConfigDict(meta["config"])
    for key, value in (config_overrides or {}).items():
      _override(config, key, value, workdir)

    try:
      run = setup_run(config, workdir, saved_meta=meta)
    except FileNotFoundError as error:
      raise FileNotFoundError(
          f"{error}\nTo evaluate with data that moved since training, pass its new location "
          "with --override data.path=PATH (or data.data_dir=DIR for tfds)."
      ) from error
    restored, _ = checkpointer.restore(run.launcher.unreplicate(run.state), step, which)
    state = run.launcher.replicate(restored) if run.launcher.mode == "pmap" else restored
  finally:
    checkpointer.close()
  return run, state, step, config


def evaluate_checkpoint(
    workdir: str, which: str = "latest", config_overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Evaluates a saved checkpoint of `workdir` on its test split.

  The config comes from the checkpoint itself, so the model and data match the
  run that wrote it. Arguments are those of `restore_for_eval`.

  Returns:
    `{"checkpoint": which, "step": ..., "eval_accuracy": ..., "eval_top5": ...,
    "eval_loss": ..., "eval_examples": ...}`.
  """
  run, state, step, config = restore_for_eval(workdir, which, config_overrides)
  _, eval_step = run.make_steps(config)
  eval_step = run.launcher.compile_eval_step(eval_step)
  evaluation = evaluate(
      eval_step,
      run.launcher,
      state,
      run.data.test_arrays,
      run.eval_batch_size,
      trim=run.data.test_trim,
  )
  return {
      "checkpoint": which,
      "step": step,
      "model": config.model.name,
      "dataset": run.dataset.name,
      "eval_accuracy": evaluation["accuracy"],
      "eval_top5": evaluation["top5"],
      "eval_loss": evaluation["loss"],
      "eval_examples": evaluation["examples"],
  }
