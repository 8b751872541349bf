"""ResNet-20 on CIFAR-10 read from an image folder or its .tar.gz (`split/class/image`).

Command:
  JAXBASE_DATA_DIR=/path/to/data python scripts/train.py \
      --config jaxbase/configs/cifar10_folder_resnet20.py --workdir runs/cifar10_folder_resnet20

The data path comes from `--config.data.path=PATH` (a folder or a .tar.gz), or
else from `$JAXBASE_DATA_DIR/cifar10-jpeg.tar.gz`. The first run decodes the
60,000 images once and caches them as arrays (see `data.cache_dir`).
Recipe: as `cifar10_resnet20.py` (20 epochs, batch 128, SGD + Nesterov,
one-cycle, crop + flip).
Hardware, result and time: the "ResNet-20, CIFAR-10 (JPEG)" row of
BENCHMARKS.md, measured on 2 CPU cores.
"""

import ml_collections

from jaxbase.configs import cifar10_resnet20


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_resnet20.get_config()
  config.data.source = "folder"
  config.data.name = "cifar10_jpeg"
  config.data.default_file = "cifar10-jpeg.tar.gz"
  return config
