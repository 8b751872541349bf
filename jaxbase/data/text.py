"""Text classification data: TSV and tfds sources, a subword tokenizer, fixed-length encoding.

A text run goes through three steps:

1. `load_text_dataset(config)` reads sentences and integer labels, from TSV
   files (`label<TAB>text` with a header, one file per split) or from a
   prepared tfds data set such as `glue/sst2`.
2. `SubwordTokenizer.train(texts, ...)` learns a subword vocabulary on the
   training sentences with HuggingFace `tokenizers`. The tokenizer
   serializes to one JSON string, which the training loop writes to the work
   directory and into every checkpoint, so evaluation and fine-tuning read
   the same vocabulary.
3. `encode_dataset` turns sentences into `[CLS] tokens [SEP]` id arrays padded
   to `max_length`, with a padding mask (1 for real tokens, 0 for padding).
   Longer sentences are truncated to `max_length` tokens, their last token
   being [SEP], and the number of truncated sentences is logged.
"""

import dataclasses
import json
import os
import pathlib

from absl import logging
import numpy as np

from jaxbase.data import text_files

TEXT_SOURCES = ("tsv", "tfds_text")
# Special tokens, in id order: [PAD] is 0, so zero-filled arrays are padding.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """Sentences and labels of a text classification data set, before tokenization.

  Attributes:
    name: data set name, for logs.
    train_texts: training sentences.
    train_labels: int32[n_train] class indices.
    test_texts: evaluation sentences.
    test_labels: int32[n_test].
    class_names: class names in label order.
  """

  name: str
  train_texts: tuple[str, ...]
  train_labels: np.ndarray
  test_texts: tuple[str, ...]
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class TokenizedDataset:
  """A text data set encoded to fixed-length token ids, ready for batching.

  Attributes:
    name: data set name.
    train_arrays: 'token_ids' int32[n_train, max_length], 'padding_mask'
      int32[n_train, max_length] and 'labels' int32[n_train].
    test_arrays: the same for the evaluation split.
    class_names: class names in label order.
    vocab_size: vocabulary size of the tokenizer.
    max_length: sequence length of every example.
  """

  name: str
  train_arrays: dict[str, np.ndarray]
  test_arrays: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  vocab_size: int
  max_length: int

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


# Sources.


def load_text_dataset(config) -> TextDataset:
  """Load the text data set that the `data` config section describes.

  Fields read:
    source: 'tsv' or 'tfds_text'.
    path: 'tsv' only: the folder with `{split}.tsv` files. None means
      `$JAXBASE_DATA_DIR/{default_file}`.
    default_file: 'tsv' only: the folder name looked up in `$JAXBASE_DATA_DIR`.
    name: data set name; for 'tfds_text' the tfds name, e.g. 'glue/sst2'.
    data_dir: 'tfds_text' only: the tfds data directory.
    text_feature: 'tfds_text' only: the feature with the text ('sentence').
    train_split, test_split: split names.
    class_names: optional class names in label order.

  Raises:
    ValueError: on an unknown source or invalid files; FileNotFoundError on
      missing files or an unprepared tfds data set.
  """
  # Imported here because sources imports this module for its dispatch.
  from jaxbase.data import sources  # pylint: disable=g-import-not-at-top

  source = config.get("source")
  train_split = config.get("train_split") or "train"
  test_split = config.get("test_split") or "test"
  class_names = config.get("class_names")
  if source == "tsv":
    folder = sources.resolve_folder_path(config)
    name = config.get("name") or folder.name
    return load_tsv(folder, name=name, splits=(train_split, test_split), class_names=class_names)
  if source == "tfds_text":
    return load_tfds_text(
        config.get("name"),
        data_dir=config.get("data_dir"),
        splits=(train_split, test_split),
        text_feature=config.get("text_feature") or "sentence",
        class_names=class_names,
    )
  raise ValueError(
      f"unknown text data source {source!r}; set data.source to one of {', '.join(TEXT_SOURCES)}"
  )


def read_tsv(
    path: str | os.PathLike, num_classes: int | None = None
) -> tuple[list[str], np.ndarray]:
  """Reads a `label<TAB>text` file with a header row; returns (texts, int32 labels).

  The header has two columns, one of them named 'label', in either order.
  Parsing and its errors are those of `jaxbase.data.text_files.read_tsv`; with
  `num_classes`, a label outside [0, num_classes) is reported with its line.
  """
  labels, texts = text_files.read_tsv(path, num_classes)
  return list(texts), labels


def _class_names(class_names, labels: list[np.ndarray], description: str) -> tuple[str, ...]:
  num_classes = int(max(l.max() for l in labels)) + 1
  if min(int(l.min()) for l in labels) < 0:
    raise ValueError(
        f"{description} has negative labels; unlabelled splits (such as tfds glue test "
        "splits, labelled -1) cannot be used for training or evaluation"
    )
  if class_names is None:
    return tuple(str(i) for i in range(num_classes))
  if len(class_names) < num_classes:
    raise ValueError(
        f"{description} has labels up to {num_classes - 1} but data.class_names has "
        f"{len(class_names)} names: {list(class_names)}"
    )
  return tuple(class_names)


def load_tsv(
    folder: str | os.PathLike,
    *,
    name: str,
    splits: tuple[str, str] = ("train", "test"),
    class_names=None,
) -> TextDataset:
  """Load `{folder}/{split}.tsv` for the train and test splits (see `read_tsv`)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise FileNotFoundError(
        f"TSV folder {folder} not found; pass --config.data.path=FOLDER with "
        f"{splits[0]}.tsv and {splits[1]}.tsv in it"
    )
  num_classes = len(class_names) if class_names else None
  train_texts, train_labels = read_tsv(folder / f"{splits[0]}.tsv", num_classes)
  test_texts, test_labels = read_tsv(folder / f"{splits[1]}.tsv", num_classes)
  return TextDataset(
      name=name,
      train_texts=tuple(train_texts),
      train_labels=train_labels,
      test_texts=tuple(test_texts),
      test_labels=test_labels,
      class_names=_class_names(class_names, [train_labels, test_labels], str(folder)),
  )


def load_tfds_text(
    name: str,
    *,
    data_dir=None,
    splits: tuple[str, str] = ("train", "validation"),
    text_feature: str = "sentence",
    class_names=None,
) -> TextDataset:
  """Read a prepared tfds text classification data set, e.g. 'glue/sst2'.

  Like `sources.load_tfds`, it never downloads: the data set must be prepared
  in array_record format in `data_dir`, and it is read with
  `tfds.data_source`, which needs no TensorFlow. Records need `text_feature`
  (bytes or str) and 'label'.

  Raises:
    ValueError: on a missing name, an unknown data set, or records without
      the features.
    FileNotFoundError: if the data set is not prepared in `data_dir`.
  """
  if not name:
    raise ValueError("data.name is empty; set it to a tfds name, e.g. --config.data.name=glue/sst2")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # NOTE: tfds 4.9.10 registers its text builders (glue among them) only when
  # this module is imported; `import tensorflow_datasets` alone leaves them
  # unknown to tfds.builder.
  import tensorflow_datasets.text  # pylint: disable=g-import-not-at-top,unused-import

  if data_dir is not None:
    data_dir = os.path.expanduser(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(f"unknown tfds data set {name!r}; check data.name") from error
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds data set {name!r} is not prepared in {builder.data_dir}; jaxbase never "
        "downloads data. Prepare it once with TensorFlow installed: "
        f"tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'} "
        "--file_format=array_record"
    )

  split_data = []
  for split in splits:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    records = source.__getitems__(list(range(len(source))))
    texts, labels = [], []
    for index, record in enumerate(records):
      if text_feature not in record or "label" not in record:
        raise ValueError(
            f"{name} {split} record {index} has features {sorted(record)}, but jaxbase needs "
            f"{text_feature!r} (data.text_feature) and 'label'"
        )
      text = record[text_feature]
      texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
      labels.append(int(record["label"]))
    split_data.append((tuple(texts), np.asarray(labels, np.int32)))

  if class_names is None:
    feature = builder.info.features["label"] if builder.info.features else None
    class_names = getattr(feature, "names", None)
  (train_texts, train_labels), (test_texts, test_labels) = split_data
  return TextDataset(
      name=name,
      train_texts=train_texts,
      train_labels=train_labels,
      test_texts=test_texts,
      test_labels=test_labels,
      class_names=_class_names(class_names, [train_labels, test_labels], f"tfds {name}"),
  )


# Tokenizer.


class SubwordTokenizer:
  """A subword tokenizer (HuggingFace `tokenizers`) with BERT's special tokens.

  Text is lower-cased and accents are stripped (BERT's uncased normalizer),
  split on whitespace and punctuation, then into subwords. Encoding wraps
  each sentence as `[CLS] ... [SEP]`. The special tokens have the ids of
  `SPECIAL_TOKENS`: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.

  The vocabulary is learned by byte-pair encoding (Sennrich et al. 2016),
  with no marker on word-internal subwords, in the role of BERT's WordPiece.
  The reason is reproducibility. In `tokenizers` 0.23.3, the WordPiece
  trainer and BPE with a '##' continuation prefix break ties between equally
  frequent merges in a different order on each call, so they gave another
  vocabulary for the same text. This setting gave the same one every time on
  SST-2.
  """

  def __init__(self, tokenizer):
    """Wrap a `tokenizers.Tokenizer`; use `train` or `from_json` to make one.

    Raises:
      ValueError: if a special token is missing or has another id.
    """
    self.tokenizer = tokenizer
    for expected_id, token in enumerate(SPECIAL_TOKENS):
      found = tokenizer.token_to_id(token)
      if found != expected_id:
        raise ValueError(
            f"tokenizer has special token {token} at id {found}, expected {expected_id}; "
            "train it with SubwordTokenizer.train"
        )

  pad_id = 0
  unk_id = 1
  cls_id = 2
  sep_id = 3
  mask_id = 4
  # Ids below this are special tokens, never chosen as MLM targets or replacements.
  num_special = len(SPECIAL_TOKENS)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size()

  @classmethod
  def train(cls, texts, *, vocab_size: int = 8192, min_frequency: int = 2) -> "SubwordTokenizer":
    """Learn a subword vocabulary of at most `vocab_size` tokens from `texts`.

    The same texts and arguments give the same vocabulary and ids.

    Args:
      texts: the training sentences.
      vocab_size: maximum vocabulary size, special tokens included. The
        result is smaller when the text has fewer distinct subwords.
      min_frequency: subwords seen fewer times are left out.
    """
    # Imported here so that image-only users do not need `tokenizers`.
    from tokenizers import (  # pylint: disable=g-import-not-at-top
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls.cls_id), ("[SEP]", cls.sep_id)],
    )
    return cls(tokenizer)

  def to_json(self) -> str:
    """Serialize the whole tokenizer (vocabulary and rules) to a JSON string."""
    return self.tokenizer.to_str()

  @classmethod
  def from_json(cls, text: str) -> "SubwordTokenizer":
    """Rebuild a tokenizer from `to_json` output."""
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    return cls(Tokenizer.from_str(text))

  def save(self, path: str | os.PathLike) -> None:
    """Write the JSON to `path` atomically."""
    path = pathlib.Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(self.to_json(), encoding="utf-8")
    os.replace(temp, path)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SubwordTokenizer":
    return cls.from_json(pathlib.Path(path).read_text(encoding="utf-8"))

  def encode(self, texts, max_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode sentences as `[CLS] tokens [SEP]`, truncated and padded to `max_length`.

    Args:
      texts: sentences.
      max_length: the length of every output row, at least 2.

    Returns:
      `(token_ids, padding_mask, num_truncated)`: int32[n, max_length] ids
      padded with [PAD] (0), int32[n, max_length] with 1 on real tokens, and
      the number of sentences cut to fit. A cut sentence keeps its first
      `max_length - 2` subwords and ends with [SEP].
    """
    if max_length < 2:
      raise ValueError(f"max_length must be at least 2 for [CLS] and [SEP], got {max_length}")
    encodings = self.tokenizer.encode_batch(list(texts))
    token_ids = np.full((len(encodings), max_length), self.pad_id, np.int32)
    padding_mask = np.zeros((len(encodings), max_length), np.int32)
    num_truncated = 0
    for row, encoding in enumerate(encodings):
      ids = encoding.ids
      if len(ids) > max_length:
        num_truncated += 1
        ids = ids[: max_length - 1] + [self.sep_id]
      token_ids[row, : len(ids)] = ids
      padding_mask[row, : len(ids)] = 1
    return token_ids, padding_mask, num_truncated

  def __eq__(self, other) -> bool:
    if not isinstance(other, SubwordTokenizer):
      return NotImplemented
    return json.loads(self.to_json()) == json.loads(other.to_json())


def encode_dataset(
    dataset: TextDataset, tokenizer: SubwordTokenizer, max_length: int
) -> TokenizedDataset:
  """Encode both splits with `tokenizer`, logging how many sentences were truncated."""
  arrays = {}
  for split, texts, labels in (
      ("train", dataset.train_texts, dataset.train_labels),
      ("test", dataset.test_texts, dataset.test_labels),
  ):
    token_ids, padding_mask, num_truncated = tokenizer.encode(texts, max_length)
    if num_truncated:
      logging.warning(
          "Truncated %d of %d %s %s sentences to max_length %d tokens; raise model.max_length "
          "to keep them whole",
          num_truncated,
          len(texts),
          dataset.name,
          split,
          max_length,
      )
    arrays[split] = {
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "labels": np.asarray(labels, np.int32),
    }
  return TokenizedDataset(
      name=dataset.name,
      train_arrays=arrays["train"],
      test_arrays=arrays["test"],
      class_names=dataset.class_names,
      vocab_size=tokenizer.vocab_size,
      max_length=max_length,
  )
