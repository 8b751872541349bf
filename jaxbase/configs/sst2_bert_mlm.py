"""Masked-language-model pretraining of bert_mini on the SST-2 training sentences.

Command:
  JAXBASE_DATA_DIR=/path/to/data python scripts/train.py \
      --config jaxbase/configs/sst2_bert_mlm.py --workdir runs/sst2_bert_mlm

The labels are ignored: the model learns from the 67,349 training sentences
as unlabelled text. Each step masks 15% of the non-special tokens of every
sentence (80% [MASK], 10% a random token, 10% unchanged) and predicts the
originals. Evaluation reports masked-token top-1 accuracy on the dev
sentences, masked once with a fixed key. The checkpoint stores the tokenizer,
which sst2_bert_finetune.py then reuses.
Measured (BENCHMARKS.md, 2 x Intel Xeon CPU cores, 1 XLA device, shared
cores): 32.2% masked-token top-1 on the dev sentences after 12 epochs, 68.1
minutes. Five epochs reached 27.2%, and a classifier fine-tuned from that
checkpoint on 1,000 labels ended 1.7 points below one fine-tuned from the
12-epoch checkpoint (seed 0).
"""

import ml_collections

from jaxbase.configs import sst2_bert


def get_config() -> ml_collections.ConfigDict:
  config = sst2_bert.get_config()
  config.task = "mlm"

  config.mlm = ml_collections.ConfigDict()
  config.mlm.mask_rate = 0.15
  config.mlm.mask_token_fraction = 0.8
  config.mlm.random_token_fraction = 0.1

  config.optim.lr = 1e-3
  config.optim.warmup_epochs = 1.0
  config.num_epochs = 12
  config.eval_every_epochs = 2
  config.model.dropout_rate = 0.1
  config.ema.decay = 0.0
  return config
