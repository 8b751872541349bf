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
  config.model.dropout_rate = 0.0  # Inside pre-activation blocks (preact_resnet18, wrn28_10).
  config.model.drop_path_rate = 0.0  # Stochastic depth of the last block (ResNets).
  config.model.head_dropout_rate = 0.0  # Dropout before the classifier (ResNets).
  # Convolution kernels: "auto" runs oneDNN on the CPU backend when it is
  # available and XLA otherwise; "onednn" or "xla" pick one (jaxbase.kernels.conv).
  config.model.conv_impl = "auto"
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
  # Subsets, applied after loading: class indices or names to keep (relabelled in
  # that order; empty keeps all), and a number of training examples drawn per
  # class from `subset_seed` (0 keeps all).
  config.data.classes = ()
  config.data.num_train_examples = 0
  config.data.subset_seed = 0
  config.data.test_split = "test"

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_padding = 0  # Random crop after zero padding by this many pixels; 0 is off.
  config.augment.flip = False  # Random horizontal flip.
  config.augment.cutout = 0  # Side in pixels of a zeroed square; 0 is off.
  config.augment.trivial_augment = False  # One random operation per image (TrivialAugment).
  # Batch mixing, with Beta(alpha, alpha) weights; 0 is off, and at most one may be on.
  config.augment.mixup_alpha = 0.0
  config.augment.cutmix_alpha = 0.0
  config.augment.token_dropout = 0.0  # Text: fraction of word tokens replaced by [MASK].

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"
  config.optim.lr = 0.1  # Peak learning rate for the global batch.
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 5e-4
  config.optim.weight_decay_mode = "default"  # 'default' | 'l2' | 'decoupled'; see jaxbase.optim.
  config.optim.schedule = "onecycle"
  config.optim.warmup_epochs = 0.0
  config.optim.pct_start = 0.25
  config.optim.div_factor = 25.0
  config.optim.final_div_factor = 1e4
  config.optim.clip_norm = ml_collections.config_dict.placeholder(float)
  # True trains only the head (a linear probe); the rest gets no update, no weight
  # decay and no optimizer state.
  config.optim.freeze_backbone = False
  # Train steps per optimizer update: each update averages the gradients of this
  # many batches of `batch_size`, so the effective batch is their product.
  config.optim.accumulation_steps = 1

  # Starting point for fine-tuning: the --workdir of a finished run. Every
  # parameter but the head is read from its checkpoint (BatchNorm statistics too);
  # the head is new. `which` is 'latest' or 'best'.
  config.init = ml_collections.ConfigDict()
  config.init.checkpoint = ml_collections.config_dict.placeholder(str)
  config.init.which = "latest"
  config.init.resize_position_embed = False  # ViT: interpolate position embeddings to a new size.

  config.adversarial = adversarial.default_config()  # Adversarial training; off by default.

  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.0

  # Exponential moving average of the weights, used for evaluation when decay > 0.
  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.0

  config.batch_size = 128  # Global, over all devices and processes.
  config.eval_batch_size = 500
  # Test-time flips: score each test image by the mean of the logits of the image and of its
  # left-right mirror image. Image models only. It doubles the cost of evaluation.
  config.eval_flip = False
  config.num_epochs = 20
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.parallel = "shard_map"  # 'shard_map' | 'pmap'
  # A step with a NaN or inf loss or gradient never updates the state. 'raise' then stops the
  # run, naming the step; 'skip' drops that batch, counts it in metrics.jsonl
  # (train/skipped_steps) and stops only after max_consecutive_skips such steps in a row.
  config.on_nonfinite = "raise"
  config.max_consecutive_skips = 10

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = (
      1  # Save at the end of every N epochs (and at the end, and on SIGTERM/SIGINT).
  )
  config.checkpoint.every_steps = 0  # When > 0, save every N steps instead of every_epochs.
  config.checkpoint.keep = 3
  return config
