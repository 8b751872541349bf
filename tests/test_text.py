"""Tests for jaxbase.data.text (TSV and tfds sources, tokenizer, encoding) and dict batching."""

import logging
import socket

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from jaxbase import data
from jaxbase.data import pipeline
from jaxbase.data import text

TRAIN_ROWS = [
    (1, "a gorgeous , witty , seductive movie ."),
    (0, "the story is dull and the acting is worse ."),
    (1, 'a "moving" and gorgeous film'),
    (0, "dull , dull , dull"),
    (1, "witty and moving"),
    (0, "worse than dull"),
]
DEV_ROWS = [(1, "a witty film"), (0, "the acting is dull")]


def _write_tsv(path, rows, text_column="sentence"):
  lines = [f"label\t{text_column}"] + [f"{label}\t{sentence}" for label, sentence in rows]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _write_sst2(folder):
  folder.mkdir(parents=True, exist_ok=True)
  _write_tsv(folder / "train.tsv", TRAIN_ROWS)
  _write_tsv(folder / "dev.tsv", DEV_ROWS, text_column="content")
  return folder


def _tsv_config(path=None, **overrides):
  config = ml_collections.ConfigDict(
      {
          "source": "tsv",
          "name": "tiny_sst",
          "path": str(path) if path else None,
          "default_file": "sst2",
          "train_split": "train",
          "test_split": "dev",
          "class_names": ("negative", "positive"),
      }
  )
  config.update(overrides)
  return config


def test_read_tsv_keeps_quotes_and_finds_label_column(tmp_path):
  texts, labels = text.read_tsv(_write_tsv(tmp_path / "a.tsv", TRAIN_ROWS))
  assert texts[2] == 'a "moving" and gorgeous film'
  np.testing.assert_array_equal(labels, [1, 0, 1, 0, 1, 0])
  assert labels.dtype == np.int32
  # The label column may come second.
  (tmp_path / "b.tsv").write_text("content\tlabel\nfine film\t1\n", encoding="utf-8")
  texts, labels = text.read_tsv(tmp_path / "b.tsv")
  assert texts == ["fine film"]
  np.testing.assert_array_equal(labels, [1])


@pytest.mark.parametrize(
    "content, message",
    [
        ("sentence\tscore\nx\t1\n", "line 1: expected the header 'label<TAB>text'"),
        ("label\tsentence\n1\tok\n0\tbad\textra\n", "line 3: expected 2 tab-separated fields"),
        ("label\tsentence\npositive\tok\n", "line 2: the label 'positive' is not an integer"),
        ("label\tsentence\n", "has a header but no examples"),
    ],
)
def test_read_tsv_rejects_bad_files(tmp_path, content, message):
  path = tmp_path / "bad.tsv"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(ValueError, match=message):
    text.read_tsv(path)


def test_load_dataset_reads_tsv_from_data_dir_env(tmp_path, monkeypatch):
  _write_sst2(tmp_path / "sst2")
  monkeypatch.setenv("JAXBASE_DATA_DIR", str(tmp_path))
  dataset = data.load_dataset(_tsv_config())
  assert isinstance(dataset, text.TextDataset)
  assert dataset.train_texts == tuple(sentence for _, sentence in TRAIN_ROWS)
  assert dataset.test_texts == ("a witty film", "the acting is dull")
  np.testing.assert_array_equal(dataset.test_labels, [1, 0])
  assert dataset.class_names == ("negative", "positive")


def test_load_tsv_missing_folder_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="TSV folder .* not found"):
    data.load_dataset(_tsv_config(tmp_path / "nowhere"))


def test_tsv_label_beyond_class_names_names_line(tmp_path):
  folder = _write_sst2(tmp_path / "sst2")
  _write_tsv(folder / "dev.tsv", [(1, "a witty film"), (2, "neither here nor there")])
  with pytest.raises(ValueError, match=r"dev.tsv, line 3: the label 2 is outside \[0, 2\)"):
    data.load_dataset(_tsv_config(folder))


def _tokenizer(vocab_size=60):
  texts = [sentence for _, sentence in TRAIN_ROWS]
  return text.SubwordTokenizer.train(texts, vocab_size=vocab_size, min_frequency=1)


def test_tokenizer_special_ids_and_round_trip(tmp_path):
  tokenizer = _tokenizer()
  for index, token in enumerate(text.SPECIAL_TOKENS):
    assert tokenizer.tokenizer.token_to_id(token) == index
  assert tokenizer.vocab_size <= 60
  path = tmp_path / "tokenizer.json"
  tokenizer.save(path)
  loaded = text.SubwordTokenizer.load(path)
  assert loaded == tokenizer
  sentences = ["a witty , gorgeous film", "unseen words zzz"]
  np.testing.assert_array_equal(loaded.encode(sentences, 16)[0], tokenizer.encode(sentences, 16)[0])


def test_tokenizer_training_is_deterministic():
  assert _tokenizer() == _tokenizer()
  assert _tokenizer(vocab_size=60) != _tokenizer(vocab_size=45)


def test_encode_wraps_pads_and_masks():
  tokenizer = _tokenizer()
  token_ids, padding_mask, num_truncated = tokenizer.encode(["dull film", "witty"], 8)
  assert num_truncated == 0
  assert token_ids.dtype == np.int32
  assert token_ids.shape == padding_mask.shape == (2, 8)
  for row in range(2):
    length = int(padding_mask[row].sum())
    assert token_ids[row, 0] == tokenizer.cls_id
    assert token_ids[row, length - 1] == tokenizer.sep_id
    np.testing.assert_array_equal(padding_mask[row, :length], 1)
    np.testing.assert_array_equal(padding_mask[row, length:], 0)
    np.testing.assert_array_equal(token_ids[row, length:], tokenizer.pad_id)
  # The padding mask comes from padding, not from the ids: a sentence of
  # unknown words has no [PAD] among its real tokens.
  ids, mask, _ = tokenizer.encode(["qqq"], 6)
  assert tokenizer.pad_id not in ids[0, : mask[0].sum()]


def test_encode_truncates_and_counts():
  tokenizer = _tokenizer()
  long_sentence = " ".join(["dull"] * 20)
  token_ids, padding_mask, num_truncated = tokenizer.encode([long_sentence, "witty"], 6)
  assert num_truncated == 1
  np.testing.assert_array_equal(padding_mask[0], 1)
  assert token_ids[0, 0] == tokenizer.cls_id
  assert token_ids[0, -1] == tokenizer.sep_id
  full = tokenizer.encode([long_sentence], 64)[0][0]
  np.testing.assert_array_equal(token_ids[0, 1:5], full[1:5])


def test_encode_dataset_logs_truncated_count(tmp_path, caplog):
  dataset = text.load_tsv(_write_sst2(tmp_path / "sst2"), name="tiny", splits=("train", "dev"))
  tokenizer = _tokenizer()
  lengths = tokenizer.encode(dataset.train_texts, 64)[1].sum(axis=1)
  expected = int(np.sum(lengths > 8))
  assert 0 < expected < len(lengths)
  with caplog.at_level(logging.WARNING):
    encoded = text.encode_dataset(dataset, tokenizer, max_length=8)
  messages = [r.getMessage() for r in caplog.records]
  assert any(
      f"Truncated {expected} of 6 tiny train sentences to max_length 8" in m for m in messages
  )
  assert encoded.train_arrays["token_ids"].shape == (6, 8)
  np.testing.assert_array_equal(encoded.test_arrays["labels"], [1, 0])
  assert encoded.vocab_size == _tokenizer().vocab_size


def test_select_subset_is_deterministic_and_ordered():
  arrays = {"token_ids": np.arange(100).reshape(50, 2), "labels": np.arange(50)}
  first = pipeline.select_subset(arrays, 10, seed=3)
  np.testing.assert_array_equal(
      first["labels"], pipeline.select_subset(arrays, 10, seed=3)["labels"]
  )
  assert not np.array_equal(first["labels"], pipeline.select_subset(arrays, 10, seed=4)["labels"])
  assert np.all(np.diff(first["labels"]) > 0)
  np.testing.assert_array_equal(first["token_ids"][:, 0], 2 * first["labels"])
  with pytest.raises(ValueError, match="cannot select 51 of 50"):
    pipeline.select_subset(arrays, 51, seed=0)


def test_dict_batches_keep_rows_aligned():
  arrays = {
      "token_ids": np.arange(40).reshape(10, 4).astype(np.int32),
      "padding_mask": np.ones((10, 4), np.int32),
      "labels": np.arange(10).astype(np.int32),
  }
  batches = pipeline.train_batches_from_arrays(arrays, global_batch_size=4, seed=0)
  seen = []
  for _ in range(2):
    batch = next(batches)
    np.testing.assert_array_equal(batch["token_ids"][:, 0], 4 * batch["labels"])
    seen.extend(batch["labels"].tolist())
  assert len(set(seen)) == 8

  eval_batches = list(pipeline.eval_batches_from_arrays(arrays, global_batch_size=4))
  assert len(eval_batches) == 3
  last = eval_batches[-1]
  np.testing.assert_array_equal(last["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(last["padding_mask"][2:], 0)
  np.testing.assert_array_equal(last["token_ids"][2:], 0)
  assert sum(batch["mask"].sum() for batch in eval_batches) == 10


def test_dict_batches_reject_uneven_arrays():
  with pytest.raises(ValueError, match="differ in length"):
    pipeline.train_batches_from_arrays(
        {"a": np.zeros(4), "b": np.zeros(5)}, global_batch_size=2, seed=0
    )


def _ragged_arrays(num_examples=200, max_length=32, seed=0):
  """Token arrays padded on the right to `max_length`, with random sentence lengths."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_length + 1, num_examples)
  padding_mask = (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32)
  token_ids = rng.integers(5, 50, (num_examples, max_length)).astype(np.int32) * padding_mask
  labels = np.arange(num_examples, dtype=np.int32)
  return {"token_ids": token_ids, "padding_mask": padding_mask, "labels": labels}, lengths


def test_sequence_lengths_end_at_last_token():
  mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])
  np.testing.assert_array_equal(pipeline.sequence_lengths(mask), [2, 0, 4, 3])


@pytest.mark.parametrize("sort_window", [0, 4])
def test_trimmed_batches_cut_only_padding(sort_window):
  arrays, lengths = _ragged_arrays()
  trim = pipeline.SequenceTrim(pipeline.sequence_lengths(arrays["padding_mask"]), 8, sort_window)
  plain = pipeline.train_batches_from_arrays(arrays, global_batch_size=16, seed=3)
  trimmed = pipeline.train_batches_from_arrays(arrays, global_batch_size=16, seed=3, trim=trim)
  steps = pipeline.steps_per_epoch(200, 16)
  seen, widths = [], []
  for _ in range(steps):
    batch = next(trimmed)
    rows = batch["labels"]
    width = batch["token_ids"].shape[1]
    widths.append(width)
    assert width % 8 == 0
    assert width - 8 < lengths[rows].max() <= width
    # The kept columns are the stored rows; the cut columns held padding only.
    np.testing.assert_array_equal(batch["token_ids"], arrays["token_ids"][rows, :width])
    np.testing.assert_array_equal(batch["padding_mask"], arrays["padding_mask"][rows, :width])
    assert not arrays["padding_mask"][rows, width:].any()
    seen.extend(rows.tolist())
  # An epoch visits as many distinct examples as without trimming.
  assert len(set(seen)) == steps * 16
  plain_rows = np.concatenate([next(plain)["labels"] for _ in range(steps)])
  if sort_window:
    # Sorting changes which examples share a batch, but not which are visited.
    assert set(seen) == set(plain_rows.tolist())
    assert np.mean(widths) < 28  # Random batches of 16 almost always need all 32 columns.
  else:
    np.testing.assert_array_equal(seen, plain_rows)


def test_trimmed_batches_resume_and_shard_consistently():
  arrays, _ = _ragged_arrays(num_examples=96)
  trim = pipeline.SequenceTrim(pipeline.sequence_lengths(arrays["padding_mask"]), 4, 3)
  kwargs = dict(global_batch_size=8, seed=5, trim=trim)
  whole = pipeline.train_batches_from_arrays(arrays, **kwargs)
  batches = [next(whole) for _ in range(30)]  # More than two epochs of 12 steps.
  resumed = pipeline.train_batches_from_arrays(arrays, start_step=17, **kwargs)
  for batch in batches[17:]:
    again = next(resumed)
    for name in batch:
      np.testing.assert_array_equal(again[name], batch[name])
  halves = [
      pipeline.train_batches_from_arrays(arrays, process_index=p, process_count=2, **kwargs)
      for p in range(2)
  ]
  for batch in batches:
    first, second = next(halves[0]), next(halves[1])
    for name in batch:
      np.testing.assert_array_equal(np.concatenate([first[name], second[name]]), batch[name])


def test_trimmed_eval_batches_keep_every_example_once():
  arrays, lengths = _ragged_arrays(num_examples=37)
  trim = pipeline.SequenceTrim(pipeline.sequence_lengths(arrays["padding_mask"]), 8)
  batches = list(pipeline.eval_batches_from_arrays(arrays, global_batch_size=16, trim=trim))
  assert len(batches) == 3
  for index, batch in enumerate(batches):
    real = batch["mask"].astype(bool)
    rows = np.arange(16 * index, 16 * index + real.sum())
    np.testing.assert_array_equal(batch["labels"][real], rows)
    width = batch["token_ids"].shape[1]
    assert width - 8 < lengths[rows].max() <= width
    np.testing.assert_array_equal(batch["token_ids"][real], arrays["token_ids"][rows, :width])


def test_sequence_trim_rejects_mismatched_lengths():
  arrays, _ = _ragged_arrays(num_examples=20)
  with pytest.raises(ValueError, match="lengths has 19 rows, but the arrays have 20"):
    pipeline.train_batches_from_arrays(
        arrays, global_batch_size=4, seed=0, trim=pipeline.SequenceTrim(np.ones(19, int))
    )
  with pytest.raises(ValueError, match="multiple must be >= 1, got 0"):
    pipeline.eval_batches_from_arrays(
        arrays, global_batch_size=4, trim=pipeline.SequenceTrim(np.ones(20, int), multiple=0)
    )


@pytest.fixture
def no_network(monkeypatch):
  attempts = []

  def reject_connect(sock, address, *args):
    attempts.append(address)
    raise AssertionError(f"network connection attempted to {address}")

  monkeypatch.setattr(socket.socket, "connect", reject_connect)
  return attempts


def test_tfds_glue_sst2_with_mock_data(no_network, monkeypatch):
  # mock_data points the builder at a missing directory, so the preparation
  # check is patched; see test_data.py for the __getitems__ workaround.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  original_getitems = mocking._getitems
  monkeypatch.setattr(
      mocking,
      "_getitems",
      lambda record_keys, generator, serialized=False: original_getitems(
          None, record_keys, generator, serialized
      ),
  )
  config = ml_collections.ConfigDict(
      {
          "source": "tfds_text",
          "name": "glue/sst2",
          "data_dir": "/nonexistent/tfds",
          "train_split": "train",
          "test_split": "validation",
          "text_feature": "sentence",
      }
  )
  with tfds.testing.mock_data(num_examples=9, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = data.load_dataset(config)
  assert no_network == []
  assert len(dataset.train_texts) == len(dataset.test_texts) == 9
  assert all(isinstance(sentence, str) for sentence in dataset.train_texts)
  assert dataset.class_names == ("negative", "positive")
  assert set(dataset.train_labels.tolist()) <= {0, 1}


def test_tfds_text_missing_feature_raises(monkeypatch):
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  original_getitems = mocking._getitems
  monkeypatch.setattr(
      mocking,
      "_getitems",
      lambda record_keys, generator, serialized=False: original_getitems(
          None, record_keys, generator, serialized
      ),
  )
  with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match="needs 'text'"):
      text.load_tfds_text("glue/sst2", splits=("train", "validation"), text_feature="text")


def test_fresh_run_replaces_a_stale_tokenizer_file(tmp_path):
  # A tokenizer.json left by an attempt with other settings must not be reused.
  from jaxbase.train import run_data

  dataset = data.load_dataset(_tsv_config(_write_sst2(tmp_path / "sst2")))
  workdir = tmp_path / "run"
  workdir.mkdir()
  _tokenizer(vocab_size=40).save(workdir / "tokenizer.json")
  config = ml_collections.ConfigDict({"tokenizer": {"vocab_size": 60, "min_frequency": 1}})
  tokenizer = run_data.resolve_tokenizer(
      config, str(workdir), dataset, saved_json=None, pretrained_json=None
  )
  assert tokenizer.to_json() == _tokenizer(vocab_size=60).to_json()
  assert text.SubwordTokenizer.load(workdir / "tokenizer.json").to_json() == tokenizer.to_json()
