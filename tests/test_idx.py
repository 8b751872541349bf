"""Tests for the IDX reader and the 'idx' data source."""

import gzip
import os

import ml_collections
import numpy as np
import pytest

from jaxbase.data import idx, load_dataset


def _write_idx(path, array, compress=False):
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  content = header + array.astype(np.uint8).tobytes()
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(content)


def _write_split_files(directory, compress=False, num_train=12, num_test=5):
  rng = np.random.default_rng(0)
  suffix = ".gz" if compress else ""
  arrays = {}
  for split, count in (("train", num_train), ("test", num_test)):
    image_stem, label_stem = idx.SPLIT_FILES[split]
    images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    _write_idx(os.path.join(directory, image_stem + suffix), images, compress)
    _write_idx(os.path.join(directory, label_stem + suffix), labels, compress)
    arrays[split] = (images, labels)
  return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_idx_source_reads_both_splits(tmp_path, compress):
  arrays = _write_split_files(str(tmp_path), compress)
  dataset = load_dataset(ml_collections.ConfigDict({"source": "idx", "path": str(tmp_path)}))
  np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train"][0])
  np.testing.assert_array_equal(dataset.test_labels, arrays["test"][1])
  assert dataset.train_images.shape == (12, 28, 28, 1)
  assert dataset.train_labels.dtype == np.int32
  assert dataset.class_names == idx.FASHION_MNIST_CLASSES


def test_idx_bad_magic_raises(tmp_path):
  path = str(tmp_path / "bad")
  with open(path, "wb") as f:
    f.write(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # 0x0D: float32 elements.
  with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
    idx.read_idx(path)


def test_idx_truncated_raises(tmp_path):
  path = str(tmp_path / "short")
  _write_idx(path, np.zeros((4, 3), np.uint8))
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 2)
  with pytest.raises(ValueError, match="truncated or corrupt"):
    idx.read_idx(path)


def test_idx_count_mismatch_raises(tmp_path):
  _write_split_files(str(tmp_path))
  _write_idx(str(tmp_path / idx.SPLIT_FILES["test"][1]), np.zeros(4, np.uint8))
  with pytest.raises(ValueError, match="has 5 images but .* has 4 labels"):
    load_dataset(ml_collections.ConfigDict({"source": "idx", "path": str(tmp_path)}))


def test_idx_missing_file_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    load_dataset(ml_collections.ConfigDict({"source": "idx", "path": str(tmp_path)}))


def test_real_fashion_mnist_if_installed():
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
  dataset = load_dataset(ml_collections.ConfigDict({"source": "idx"}))
  assert dataset.train_images.shape == (60000, 28, 28, 1)
  assert dataset.test_images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)
