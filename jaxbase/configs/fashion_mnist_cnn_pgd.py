"""The Fashion-MNIST CNN with PGD adversarial training at eps 0.1 (L-inf).

Command:
  python scripts/train.py --config jaxbase/configs/fashion_mnist_cnn_pgd.py \
      --workdir runs/fashion_mnist_cnn_pgd
  python scripts/evaluate.py --workdir runs/fashion_mnist_cnn_pgd --attacks pgd20 --eps 0,0.1

Training attack: PGD with 7 steps of 0.025 from a random start, eps warmed up
over the first epoch. 5 epochs, half the normal recipe's 10, because each step
costs about 8 clean steps. Same model, data and optimizer as fashion_mnist_cnn.py.
Hardware, result and time: the Fashion-MNIST rows of BENCHMARKS.md.
"""

import ml_collections

from jaxbase.configs import fashion_mnist_cnn


def get_config() -> ml_collections.ConfigDict:
  config = fashion_mnist_cnn.get_config()
  config.adversarial.method = "pgd"
  config.adversarial.eps = 0.1
  config.adversarial.step_size = 0.025
  config.adversarial.num_steps = 7
  config.adversarial.eps_warmup_epochs = 1.0
  config.num_epochs = 5
  return config
