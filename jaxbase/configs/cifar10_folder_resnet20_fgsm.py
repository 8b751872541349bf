"""ResNet-20 on the CIFAR-10 JPEG folder with FGSM adversarial training from a random start.

Command:
  JAXBASE_DATA_DIR=/path/to/data python scripts/train.py \
      --config jaxbase/configs/cifar10_folder_resnet20_fgsm.py \
      --workdir runs/cifar10_folder_resnet20_fgsm
  python scripts/evaluate.py --workdir runs/cifar10_folder_resnet20_fgsm \
      --attacks pgd20 --eps 0,8/255 --num_examples 2000

Training attack: L-inf eps 8/255, one FGSM step of 1.25 eps (10/255) from a
uniform random start in the eps-ball (Wong, Rice and Kolter 2020, "Fast is
better than free"). Each train step does one extra forward and backward pass;
on 2 CPU cores it ran at about a third of the clean step's speed.
Budget: 5 epochs. Otherwise the recipe is `cifar10_folder_resnet20.py`:
batch 128, SGD with Nesterov momentum, one-cycle learning rate (peak 0.2 here),
weight decay 5e-4, random crop and flip. No label smoothing, which can mask
gradients and inflate robust accuracy.
Result on 2 Intel Xeon cores (2026-12-05): 57.53% clean top-1 on the 10,000 test
images and 30.95% under PGD-20 at eps 8/255 on 2,000 of them, after 76 minutes
of training. Details: the CIFAR-10 robustness section of BENCHMARKS.md.
"""

import ml_collections

from jaxbase.configs import cifar10_folder_resnet20


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_folder_resnet20.get_config()
  config.optim.lr = 0.2
  config.loss.label_smoothing = 0.0
  config.num_epochs = 5

  config.adversarial.method = "fgsm_rs"
  config.adversarial.eps = 8 / 255
  return config
