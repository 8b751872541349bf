"""ResNet-20 on scikit-learn's bundled 8x8 digits: the default run that needs no download.

Command:
  python scripts/train.py --config jaxbase/configs/digits_resnet.py --workdir runs/digits

Data: 1,797 grayscale 8x8 images, split 80/20 (stratified, fixed seed) into
1,437 train and 360 test images.
Hardware and expected result: see the digits row in BENCHMARKS.md (2 CPU
cores: about 98% test top-1 in under two minutes).
"""

import ml_collections

from jaxbase.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = "resnet20"
  # Statistics of the digits pixels scaled to [0, 1].
  config.model.mean = (0.3053,)
  config.model.std = (0.3760,)

  config.data.source = "digits"
  config.data.name = "digits"

  # Digits are not mirror-symmetric, so no flip; a one-pixel shift is a safe augmentation.
  config.augment.crop_padding = 1
  config.augment.flip = False

  config.optim.lr = 0.1
  config.optim.weight_decay = 5e-4
  config.batch_size = 64
  config.eval_batch_size = 128
  config.num_epochs = 30
  config.eval_every_epochs = 5
  config.log_every_steps = 20
  return config
