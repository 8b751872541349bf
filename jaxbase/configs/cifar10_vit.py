"""ViT-S/4 on CIFAR-10 read from the JPEG image folder or its .tar.gz.

Command:
  JAXBASE_DATA_DIR=/path/to/data python scripts/train.py \
      --config jaxbase/configs/cifar10_vit.py --workdir runs/cifar10_vit

Data: as cifar10_folder_resnet20.py (`--config.data.path=PATH`, or else
`$JAXBASE_DATA_DIR/cifar10-jpeg.tar.gz`).
Recipe: ViT-S with 4x4 patches (64 patch tokens and a class token on 32x32
images), pre-LayerNorm, stochastic depth 0.1, AdamW at 1e-3 with weight
decay 0.05, 5 warmup epochs then cosine, batch 128, random crop (padding 4)
and horizontal flip, 100 epochs. A ViT trained from scratch on a data set
this small relies on augmentation and regularization more than a ResNet.
Hardware, expected result and time: to be measured. An estimate of the cost:
6 x 21.3M parameters x 65 tokens x 50,000 images, about 4e14 FLOPs per
epoch, which suits a GPU or TPU rather than 2 CPU cores.
"""

import ml_collections

from jaxbase.configs import cifar10_folder_resnet20


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_folder_resnet20.get_config()
  config.model.name = "vit_s/4"
  config.model.pool = "token"  # 'token' (class token) or 'gap' (mean of patch tokens).
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.model.drop_path_rate = 0.1

  # Fine-tuning from another ViT run: config.init (default.py). With
  # init.resize_position_embed, a checkpoint trained at another image size loads.

  config.optim.name = "adamw"
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 5.0
  config.optim.clip_norm = 1.0
  config.optim.freeze_backbone = False
  config.optim.layer_decay = 1.0

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 100
  return config
