"""Defaults shared by every recipe; a recipe file starts from `get_config()` and overrides."""

import ml_collections

from jaxbase.train import adversarial


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet20"
  config.model.plain = False  # True removes every shortcut (the residual-connection lever).
  config.model.dtype = "float32"  # Compute dtype; params stay float32.
  config.model.zero_init_residual = False
  config.model.dropout_rate = 0.0
  # Per-channel statistics of [0, 1] pixels, applied by the model's first layer.
  config.model.mean = (0.4914, 0.4822, 0.4465)
  config.model.std = (0.2470, 0.2435, 0.2616)

  config.data = ml_collections.ConfigDict()
  config.data.source = "digits"  # 'digits' | 'tfds' | 'folder'
  config.data.name = "digits"
  config.data.path = ml_collections.config_dict.placeholder(str)
  config.data.default_file = ml_collections.config_dict.placeholder(str)
  config.data.data_dir = ml_collections.config_dict.placeholder(str)
  config.data.cache_dir = ml_collections.config_dict.placeholder(str)
  config.data.train_split = "train"
  config.data.test_split = "test"

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # Random crop after zero padding by this many pixels; 0 is off.
  config.augment.flip = False  # Random horizontal flip.

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"
  config.optim.lr = 0.1  # Peak learning rate for the global batch.
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.schedule = "onecycle"
  config.optim.warmup_epochs = 0.0
  config.optim.pct_start = 0.25
  config.optim.div_factor = 25.0
  config.optim.final_div_factor = 1e4
  config.optim.clip_norm = ml_collections.config_dict.placeholder(float)
  # Train steps per optimizer update: each update averages the gradients of this
  # many batches of `batch_size`, so the effective batch is their product.
  config.optim.accumulation_steps = 1

  config.adversarial = adversarial.default_config()  # Adversarial training; off by default.

  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.0

  config.batch_size = 128  # Global, over all devices and processes.
  config.eval_batch_size = 500
  config.num_epochs = 20
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.parallel = "shard_map"  # 'shard_map' | 'pmap'

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = (
      1  # Save at the end of every N epochs (and at the end, and on SIGTERM/SIGINT).
  )
  config.checkpoint.every_steps = 0  # When > 0, save every N steps instead of every_epochs.
  config.checkpoint.keep = 3
  return config
