"""The data of a training run: load, tokenize, subset and, for MLM, mask the eval set.

`prepare_data(config, ...)` turns the `data` section of a run config into the
train and eval arrays that the loop batches, for images and for text alike.
For text it also settles which tokenizer the run uses (see
`resolve_tokenizer`), and for fine-tuning it reads the pretrained
parameters once, since the pretrained checkpoint also contains the tokenizer.
"""

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxbase import data as data_lib
from jaxbase import losses
from jaxbase import transfer
from jaxbase.data import pipeline
from jaxbase.data import subset
from jaxbase.data import text as text_lib

TOKENIZER_FILE = "tokenizer.json"
# The eval set of an MLM run is masked once with this key, so every run and
# every evaluation scores the same tokens.
MLM_EVAL_SEED = 0


@dataclasses.dataclass
class RunData:
  """Batchable arrays and facts about the data of a run.

  Attributes:
    dataset: the loaded data set (`ImageDataset` or `TokenizedDataset`).
    train_arrays: training arrays, after `data.num_train_examples`.
    test_arrays: eval arrays; for MLM, with the fixed masks added.
    num_classes: classes of the labels.
    vocab_size: vocabulary size for text, else None.
    tokenizer: the tokenizer for text, else None.
    example_inputs: model inputs of one example, for `create_train_state`.
    description: one line for the run log.
    pretrained: pretrained parameters read from `init.checkpoint`, or None.
    pretrained_batch_stats: the BatchNorm statistics of that checkpoint
      (empty for models without BatchNorm), or None.
    train_trim: how text training batches are cut to their longest sentence
      (`data.length_multiple`, `data.sort_window`), or None.
    test_trim: the same for eval batches, or None.
  """

  dataset: Any
  train_arrays: dict[str, np.ndarray]
  test_arrays: dict[str, np.ndarray]
  num_classes: int
  vocab_size: int | None
  tokenizer: text_lib.SubwordTokenizer | None
  example_inputs: Any
  description: str
  pretrained: Any = None
  pretrained_batch_stats: Any = None
  train_trim: pipeline.SequenceTrim | None = None
  test_trim: pipeline.SequenceTrim | None = None


def resolve_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str | None,
    dataset: text_lib.TextDataset,
    *,
    saved_json: str | None,
    pretrained_json: str | None,
) -> text_lib.SubwordTokenizer:
  """Pick the tokenizer of a text run and keep a copy in `workdir/tokenizer.json`.

  The sources, in order of precedence:
  1. the tokenizer stored in the run's own checkpoint (`saved_json`, when
     resuming or evaluating);
  2. the one of the pretrained checkpoint (`pretrained_json`, when
     fine-tuning);
  3. a new one trained on the training sentences with the `tokenizer`
     config (`vocab_size`, `min_frequency`). The tokenizer is trained on every
     training sentence, before `data.num_train_examples` selects the labelled
     ones. Training is deterministic, so a fresh run trains again instead of
     reading a `tokenizer.json` that an earlier attempt left in `workdir` with
     possibly other settings, and overwrites that file.
  """
  path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if saved_json is not None:
    tokenizer = text_lib.SubwordTokenizer.from_json(saved_json)
  elif pretrained_json is not None:
    tokenizer = text_lib.SubwordTokenizer.from_json(pretrained_json)
  else:
    tokenizer_config = config.get("tokenizer") or ml_collections.ConfigDict()
    tokenizer = text_lib.SubwordTokenizer.train(
        dataset.train_texts,
        vocab_size=int(tokenizer_config.get("vocab_size", 8192)),
        min_frequency=int(tokenizer_config.get("min_frequency", 2)),
    )
    logging.info(
        "Trained a subword tokenizer of %d tokens on %d %s training sentences",
        tokenizer.vocab_size,
        len(dataset.train_texts),
        dataset.name,
    )
  if path and jax.process_index() == 0 and not _file_holds(path, tokenizer):
    if os.path.exists(path):
      logging.warning("Replacing %s with the tokenizer this run uses", path)
    tokenizer.save(path)
  return tokenizer


def _file_holds(path: str, tokenizer: text_lib.SubwordTokenizer) -> bool:
  """Return whether `path` exists and contains the JSON of `tokenizer`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f) == json.loads(tokenizer.to_json())
  except (OSError, ValueError):
    return False


def mlm_masking(
    config: ml_collections.ConfigDict, tokenizer: text_lib.SubwordTokenizer, max_length: int
) -> dict[str, Any]:
  """Return the keyword arguments of `losses.mask_tokens` from the `mlm` config."""
  mlm = config.get("mlm") or ml_collections.ConfigDict()
  mask_rate = float(mlm.get("mask_rate", 0.15))
  return dict(
      mask_id=tokenizer.mask_id,
      vocab_size=tokenizer.vocab_size,
      num_special=tokenizer.num_special,
      max_predictions=max(1, math.ceil(mask_rate * max_length)),
      mask_rate=mask_rate,
      mask_token_fraction=float(mlm.get("mask_token_fraction", 0.8)),
      random_token_fraction=float(mlm.get("random_token_fraction", 0.1)),
  )


def mask_eval_arrays(
    arrays: dict[str, np.ndarray], masking: dict[str, Any]
) -> dict[str, np.ndarray]:
  """Mask the eval set once with the fixed key `MLM_EVAL_SEED`; returns numpy arrays."""
  masked = jax.jit(lambda key, ids, mask: losses.mask_tokens(key, ids, mask, **masking))(
      jax.random.PRNGKey(MLM_EVAL_SEED),
      jnp.asarray(arrays["token_ids"]),
      jnp.asarray(arrays["padding_mask"]),
  )
  return {**arrays, **jax.device_get(masked)}


def prepare_data(
    config: ml_collections.ConfigDict,
    workdir: str | None,
    *,
    saved_tokenizer: str | None = None,
    load_pretrained: bool = False,
) -> RunData:
  """Load the data of `config` and turn it into batchable arrays.

  Args:
    config: the run config; reads `data`, `task`, `model.max_length`,
      `tokenizer`, `mlm` and `init`.
    workdir: the run's work directory, where text runs keep
      `tokenizer.json`; None keeps no copy.
    saved_tokenizer: the tokenizer JSON of the run's own checkpoint.
    load_pretrained: read `init.checkpoint` (a fresh fine-tuning run); its
      parameters land in `RunData.pretrained` and its tokenizer is used.

  Returns:
    The run's `RunData`.
  """
  task = config.get("task", "classification")
  subset_seed = int(config.data.get("subset_seed", 0))
  dataset = data_lib.load_dataset(config.data)
  pretrained = pretrained_batch_stats = None
  pretrained_json = None
  init = config.get("init") or ml_collections.ConfigDict()
  if load_pretrained and init.get("checkpoint"):
    variables, meta = transfer.restore_variables(init.checkpoint, init.get("which", "latest"))
    pretrained, pretrained_batch_stats = variables["params"], variables["batch_stats"]
    pretrained_json = meta.get("tokenizer")

  tokenizer = None
  vocab_size = None
  if isinstance(dataset, text_lib.TextDataset):
    max_length = config.model.get("max_length")
    if not max_length:
      raise ValueError("text models need model.max_length, the longest token sequence they read")
    tokenizer = resolve_tokenizer(
        config, workdir, dataset, saved_json=saved_tokenizer, pretrained_json=pretrained_json
    )
    dataset = text_lib.encode_dataset(dataset, tokenizer, int(max_length))
    vocab_size = tokenizer.vocab_size
    example_inputs = {
        "token_ids": jnp.zeros((1, dataset.max_length), jnp.int32),
        "padding_mask": jnp.ones((1, dataset.max_length), jnp.int32),
    }
    description = (
        f"{len(dataset.train_arrays['labels'])} train / {len(dataset.test_arrays['labels'])} "
        f"test sentences of {dataset.max_length} tokens, vocabulary {vocab_size}"
    )
  else:
    if config.data.get("classes"):
      dataset = subset.select_classes(dataset, config.data.classes)
    # Describes the whole training set, because the log adds "training on N of them" for a subset.
    description = (
        f"{len(dataset.train_labels)} train / {len(dataset.test_labels)} test images of shape "
        f"{dataset.image_shape}"
    )
    if config.data.get("num_train_examples"):
      dataset = subset.select_train_examples(
          dataset, int(config.data.num_train_examples), subset_seed
      )
    example_inputs = jnp.zeros((1, *dataset.image_shape), jnp.float32)

  train_arrays = dataset.train_arrays
  test_arrays = dataset.test_arrays
  num_train_examples = int(config.data.get("num_train_examples") or 0)
  if num_train_examples and tokenizer is not None:
    # Images were subset above, stratified by class.
    train_arrays = pipeline.select_subset(train_arrays, num_train_examples, subset_seed)
  if num_train_examples:
    description += f"; training on {num_train_examples} of them (data.subset_seed {subset_seed})"

  if task == "mlm":
    if tokenizer is None:
      raise ValueError("task 'mlm' needs a text data source (data.source='tsv' or 'tfds_text')")
    test_arrays = mask_eval_arrays(test_arrays, mlm_masking(config, tokenizer, dataset.max_length))

  train_trim = test_trim = None
  multiple = int(config.data.get("length_multiple", 0))
  if tokenizer is not None and multiple:
    train_trim = pipeline.SequenceTrim(
        pipeline.sequence_lengths(train_arrays["padding_mask"]),
        multiple=multiple,
        sort_window=int(config.data.get("sort_window", 0)),
    )
    test_trim = pipeline.SequenceTrim(
        pipeline.sequence_lengths(test_arrays["padding_mask"]), multiple=multiple
    )

  return RunData(
      dataset=dataset,
      train_arrays=train_arrays,
      test_arrays=test_arrays,
      num_classes=dataset.num_classes,
      vocab_size=vocab_size,
      tokenizer=tokenizer,
      example_inputs=example_inputs,
      description=description,
      pretrained=pretrained,
      pretrained_batch_stats=pretrained_batch_stats,
      train_trim=train_trim,
      test_trim=test_trim,
  )
