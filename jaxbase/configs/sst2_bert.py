"""A BERT-style classifier trained from scratch on SST-2 (binary sentiment).

Command:
  JAXBASE_DATA_DIR=/path/to/data python scripts/train.py \
      --config jaxbase/configs/sst2_bert.py --workdir runs/sst2_bert

Data: TSV files `train.tsv` and `dev.tsv` (`label<TAB>text` with a header)
in `--config.data.path=FOLDER`, or else in `$JAXBASE_DATA_DIR/sst2`; the
872-sentence GLUE dev set is the eval split. The prepared tfds `glue/sst2`
works too: `--config.data.source=tfds_text --config.data.name=glue/sst2
--config.data.test_split=validation`.
Recipe: bert_mini (4 layers, width 256, 4 heads, about 5M parameters with
the vocabulary) and a subword vocabulary of up to 8,192 tokens learned on the
training sentences. Sequences have at most 64 tokens. AdamW at 5e-4 with a
quarter-epoch warmup and cosine decay to zero, batch 128, 1 epoch. Dropout
0.2 (0.1 in attention), and evaluation of a moving average of the weights
(decay 0.998). Longer runs overfit: 2- and 3-epoch runs peaked at 81.08%
after the first epoch and ended at 79.59% (BENCHMARKS.md).
Few labels: `--config.data.num_train_examples=1000 --config.num_epochs=40
--config.optim.warmup_epochs=4 --config.batch_size=32
--config.eval_every_epochs=4` trains on 1,000 sentences drawn with
`data.subset_seed`, the baseline for sst2_bert_finetune.py.
Measured (BENCHMARKS.md, 2 x Intel Xeon CPU cores, 1 XLA device, otherwise
idle): 81.08% dev top-1 at the end, 6.3 minutes, one run (seed 0).

SST-2 training sentences average 13.4 subword tokens, so padding every one
to 64 would spend most of the compute on padding. Batches are therefore cut
to their longest sentence, rounded up to `data.length_multiple` tokens, and
sentences of similar length are batched together within windows of
`data.sort_window` batches (see `jaxbase.data.SequenceTrim`).
"""

import ml_collections

from jaxbase.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = "classification"

  config.model.name = "bert_mini"
  config.model.max_length = 64  # Tokens with [CLS] and [SEP]; longer sentences are truncated.
  config.model.dropout_rate = 0.2
  config.model.attention_dropout_rate = 0.1
  config.model.drop_path_rate = 0.0
  config.model.pre_norm = False  # BERT is post-LayerNorm.
  config.model.pool = "cls"  # Head on the [CLS] output; "mean" averages the real tokens.
  # Pixel statistics do not apply to text.
  del config.model["mean"]
  del config.model["std"]

  config.data.source = "tsv"
  config.data.name = "sst2"
  config.data.default_file = "sst2"  # Folder looked up in $JAXBASE_DATA_DIR.
  config.data.train_split = "train"
  config.data.test_split = "dev"
  config.data.class_names = ("negative", "positive")
  config.data.text_feature = "sentence"  # tfds_text only.
  config.data.num_train_examples = 0  # > 0 trains on that many sentences (data.subset_seed).
  config.data.length_multiple = 8  # Cut batches to their longest sentence, in steps of 8 tokens.
  config.data.sort_window = 32  # Batch similar lengths together within windows of 32 batches.

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.vocab_size = 8192  # Upper bound, special tokens included.
  config.tokenizer.min_frequency = 2

  # config.init.checkpoint (default.py) starts fine-tuning from a pretraining run.

  config.optim.name = "adamw"
  config.optim.lr = 5e-4
  config.optim.b2 = 0.98
  config.optim.weight_decay = 0.01
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 0.25
  config.optim.clip_norm = 1.0
  config.optim.layer_decay = 1.0  # < 1 scales each layer's learning rate (1 is off).

  config.batch_size = 128
  config.eval_batch_size = 128
  config.num_epochs = 1
  # Evaluate a moving average of the weights; SST-2 dev accuracy varies by
  # about a point from one epoch to the next, and the average smooths it.
  config.ema.decay = 0.998
  config.log_every_steps = 100
  return config
