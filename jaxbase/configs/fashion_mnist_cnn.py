"""A small CNN on Fashion-MNIST, trained normally (the reference for adversarial training).

Command:
  python scripts/train.py --config jaxbase/configs/fashion_mnist_cnn.py \
      --workdir runs/fashion_mnist_cnn
  python scripts/evaluate.py --workdir runs/fashion_mnist_cnn --attacks pgd20 --eps 0,0.1

Data: the IDX files of Debian's dataset-fashion-mnist package
(/usr/share/datasets/fashion-mnist), or another folder with
`--config.data.path`.
Hardware, result and time: the Fashion-MNIST rows of BENCHMARKS.md.
"""

import ml_collections

from jaxbase.configs import default
from jaxbase.models.cnn import FASHION_MNIST_MEAN, FASHION_MNIST_STD


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = "cnn_small"
  config.model.mean = FASHION_MNIST_MEAN
  config.model.std = FASHION_MNIST_STD

  config.data.source = "idx"
  config.data.name = "fashion_mnist"

  config.optim.name = "adamw"
  config.optim.lr = 2e-3
  config.optim.weight_decay = 1e-4
  config.optim.schedule = "onecycle"

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 10
  return config
