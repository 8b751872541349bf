"""Tests for jaxbase.data sources, validation and host-side batch iterators."""

import os
import pathlib
import socket
import tarfile

import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from jaxbase import data
from jaxbase.data import sources

# Images in the test trees are constant-colored, with pixel value
# 10 * (position of the class in sorted order) + (index within the class),
# so a loaded image shows which label and file it came from.


def _pixel_value(label: int, index: int) -> int:
  return 10 * label + index


def _save_image(path: pathlib.Path, value: int, size=(4, 6), mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  height, width = size
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  array = np.full((height, width, channels), value, np.uint8).squeeze(-1 if channels == 1 else ())
  PIL.Image.fromarray(array, mode=mode).save(path)


# Classes are created in non-alphabetical order to check that labels follow
# the sorted folder names.
_TREE_CLASSES = ("zebra", "ant", "moose")
_SORTED_CLASSES = ("ant", "moose", "zebra")
_TRAIN_PER_CLASS = 3
_TEST_PER_CLASS = 2


def _write_tree(root: pathlib.Path) -> pathlib.Path:
  """Write a PNG image-folder tree with train/ and test/ splits under root."""
  for split, count in (("train", _TRAIN_PER_CLASS), ("test", _TEST_PER_CLASS)):
    for class_name in _TREE_CLASSES:
      label = _SORTED_CLASSES.index(class_name)
      for index in range(count):
        _save_image(
            root / split / class_name / f"{index:04d}.png",
            _pixel_value(label, index),
        )
  return root


def _write_tar(tree_root: pathlib.Path, archive: pathlib.Path, top_level: str | None):
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(tree_root, arcname=top_level or ".")
  return archive


def _folder_config(path, cache_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
      {
          "source": "folder",
          "name": "tiny",
          "path": str(path) if path is not None else None,
          "default_file": "tiny.tar.gz",
          "train_split": "train",
          "test_split": "test",
          "cache_dir": str(cache_dir),
      }
  )
  config.update(overrides)
  return config


def _check_tiny_tree(dataset: data.ImageDataset):
  assert dataset.class_names == _SORTED_CLASSES
  assert dataset.train_images.shape == (9, 4, 6, 3)
  assert dataset.test_images.shape == (6, 4, 6, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32
  assert dataset.image_shape == (4, 6, 3)
  assert dataset.num_classes == 3
  expected_train_labels = np.repeat(np.arange(3), _TRAIN_PER_CLASS)
  np.testing.assert_array_equal(dataset.train_labels, expected_train_labels)
  np.testing.assert_array_equal(dataset.test_labels, np.repeat(np.arange(3), _TEST_PER_CLASS))
  expected_values = [_pixel_value(l, i) for l in range(3) for i in range(_TRAIN_PER_CLASS)]
  for image, value in zip(dataset.train_images, expected_values):
    assert np.all(image == value), (image[0, 0], value)


# Digits.


def test_digits_sizes_and_dtypes():
  dataset = data.load_dataset(ml_collections.ConfigDict({"source": "digits"}))
  assert dataset.name == "digits"
  assert dataset.train_images.shape == (1437, 8, 8, 1)
  assert dataset.test_images.shape == (360, 8, 8, 1)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32
  assert dataset.train_images.min() == 0
  assert dataset.train_images.max() == 255
  assert dataset.class_names == tuple(str(i) for i in range(10))
  assert dataset.image_shape == (8, 8, 1)


def test_digits_pixel_scaling():
  dataset = data.load_digits()
  allowed = {round(v * 255 / 16) for v in range(17)}
  assert set(np.unique(dataset.train_images).tolist()) <= allowed
  assert set(np.unique(dataset.test_images).tolist()) <= allowed


def test_digits_split_is_stratified():
  dataset = data.load_digits()
  train_counts = np.bincount(dataset.train_labels, minlength=10)
  test_counts = np.bincount(dataset.test_labels, minlength=10)
  test_fraction = test_counts / (train_counts + test_counts)
  assert np.all(np.abs(test_fraction - 0.2) < 0.01), test_fraction


def test_digits_split_is_deterministic():
  first = data.load_digits()
  second = data.load_digits()
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.train_labels, second.train_labels)
  np.testing.assert_array_equal(first.test_labels, second.test_labels)


def test_unknown_source_lists_known_ones():
  with pytest.raises(ValueError, match="digits, folder, tfds"):
    data.load_dataset(ml_collections.ConfigDict({"source": "csv"}))


# Image folders.


def test_folder_directory_labels_alphabetical(tmp_path):
  root = _write_tree(tmp_path / "tree")
  dataset = data.load_dataset(_folder_config(root, tmp_path / "cache"))
  assert dataset.name == "tiny"
  _check_tiny_tree(dataset)


def test_folder_tar_with_top_level_folder(tmp_path):
  root = _write_tree(tmp_path / "tree")
  archive = _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  dataset = data.load_image_folder(archive, cache_dir=tmp_path / "cache")
  assert dataset.name == "tiny"
  _check_tiny_tree(dataset)


def test_folder_tar_without_top_level_folder(tmp_path):
  root = _write_tree(tmp_path / "tree")
  archive = _write_tar(root, tmp_path / "flat.tar.gz", top_level=None)
  _check_tiny_tree(data.load_image_folder(archive, cache_dir=tmp_path / "cache"))


def test_folder_directory_with_top_level_folder(tmp_path):
  _write_tree(tmp_path / "outer" / "inner")
  dataset = data.load_image_folder(tmp_path / "outer", cache_dir=tmp_path / "cache")
  _check_tiny_tree(dataset)


def test_folder_skips_hidden_files(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "train" / "ant" / ".DS_Store").write_bytes(b"not an image")
  (root / "train" / "ant" / "._0000.png").write_bytes(b"macOS metadata")
  (root / "train" / ".hidden_class").mkdir()
  (root / "train" / ".hidden_class" / "x.png").write_bytes(b"junk")
  archive = _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  _check_tiny_tree(data.load_image_folder(root, cache_dir=tmp_path / "cache"))
  _check_tiny_tree(data.load_image_folder(archive, cache_dir=tmp_path / "cache"))


def test_folder_converts_grayscale_rgba_and_jpeg(tmp_path):
  root = tmp_path / "tree"
  _save_image(root / "train" / "a" / "gray.png", 77, mode="L")
  _save_image(root / "train" / "b" / "rgba.png", 200, mode="RGBA")
  _save_image(root / "test" / "a" / "color.jpg", 128)
  _save_image(root / "test" / "b" / "gray.jpg", 50, mode="L")
  dataset = data.load_image_folder(root, cache_dir=tmp_path / "cache")

  assert dataset.train_images.shape == (2, 4, 6, 3)
  assert dataset.test_images.shape == (2, 4, 6, 3)
  assert np.all(dataset.train_images[0] == 77)
  # The alpha channel is dropped, not blended.
  assert np.all(dataset.train_images[1] == 200)
  # JPEG is lossy, but a flat color survives within a few levels.
  assert np.all(np.abs(dataset.test_images[0].astype(int) - 128) <= 2)
  assert np.all(np.abs(dataset.test_images[1].astype(int) - 50) <= 2)


def test_folder_cache_written_and_reused(tmp_path, monkeypatch):
  root = _write_tree(tmp_path / "tree")
  archive = _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  cache_dir = tmp_path / "cache"
  first = data.load_image_folder(archive, cache_dir=cache_dir)

  cache_files = list(cache_dir.iterdir())
  assert len(cache_files) == 1
  assert cache_files[0].name.startswith("tiny-")
  assert cache_files[0].suffix == ".npz"
  mtime = cache_files[0].stat().st_mtime_ns

  def fail_decode(*args):
    raise AssertionError("decoded an image although the cache is valid")

  monkeypatch.setattr(sources, "_decode_image", fail_decode)
  second = data.load_image_folder(archive, cache_dir=cache_dir)
  _check_tiny_tree(second)
  np.testing.assert_array_equal(first.test_images, second.test_images)
  assert second.class_names == first.class_names
  assert cache_files[0].stat().st_mtime_ns == mtime


def test_folder_cache_invalidated_by_change(tmp_path, monkeypatch):
  root = _write_tree(tmp_path / "tree")
  cache_dir = tmp_path / "cache"
  data.load_image_folder(root, cache_dir=cache_dir)

  changed = root / "train" / "ant" / "0000.png"
  _save_image(changed, 3, size=(4, 6))
  os.utime(changed, ns=(1, 1))
  calls = []
  original_decode = sources._decode_image
  monkeypatch.setattr(
      sources, "_decode_image", lambda *args: calls.append(args) or original_decode(*args)
  )
  dataset = data.load_image_folder(root, cache_dir=cache_dir)

  assert len(calls) == 15
  assert np.all(dataset.train_images[0] == 3)
  assert len(list(cache_dir.glob("*.npz"))) == 2


def test_folder_cache_dir_from_environment(tmp_path, monkeypatch):
  root = _write_tree(tmp_path / "tree")
  monkeypatch.setenv("JAXBASE_CACHE_DIR", str(tmp_path / "env_cache"))
  data.load_image_folder(root)
  assert len(list((tmp_path / "env_cache").glob("tree-*.npz"))) == 1


def test_folder_path_from_data_dir_env(tmp_path, monkeypatch):
  root = _write_tree(tmp_path / "tree")
  _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  monkeypatch.setenv("JAXBASE_DATA_DIR", str(tmp_path))
  dataset = data.load_dataset(_folder_config(None, tmp_path / "cache"))
  _check_tiny_tree(dataset)


def test_folder_no_path_and_no_env(tmp_path, monkeypatch):
  monkeypatch.delenv("JAXBASE_DATA_DIR", raising=False)
  with pytest.raises(ValueError, match="--config.data.path") as error:
    data.load_dataset(_folder_config(None, tmp_path / "cache"))
  assert "JAXBASE_DATA_DIR" in str(error.value)


def test_folder_path_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
    data.load_image_folder(tmp_path / "missing.tar.gz", cache_dir=tmp_path)


def test_folder_not_tar_file(tmp_path):
  path = tmp_path / "images.zip"
  path.write_bytes(b"PK not a tar")
  with pytest.raises(ValueError, match="neither a directory nor a tar archive"):
    data.load_image_folder(path, cache_dir=tmp_path)


def test_folder_empty_root(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="split folder 'train' not found"):
    data.load_image_folder(tmp_path / "empty", cache_dir=tmp_path)


def test_folder_empty_class_folder(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "test" / "newt").mkdir()
  (root / "train" / "newt").mkdir()
  with pytest.raises(ValueError, match="newt in .* contains no images"):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_split_without_classes(tmp_path):
  root = tmp_path / "tree"
  (root / "train").mkdir(parents=True)
  (root / "test").mkdir()
  with pytest.raises(ValueError, match="contains no class folders and no images"):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_missing_test_split(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "test").rename(root / "validation")
  with pytest.raises(FileNotFoundError, match="split folder 'test' not found"):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_custom_split_names(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "test").rename(root / "validation")
  dataset = data.load_image_folder(root, test_split="validation", cache_dir=tmp_path / "cache")
  assert len(dataset.test_images) == 6


def test_folder_class_mismatch(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "test" / "moose").rename(root / "test" / "mouse")
  with pytest.raises(
      ValueError, match=r"only in 'train': \['moose'\], only in 'test': \['mouse'\]"
  ):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_corrupt_image_in_directory(tmp_path):
  root = _write_tree(tmp_path / "tree")
  bad = root / "train" / "moose" / "0001.png"
  bad.write_bytes(b"\x89PNG truncated")
  with pytest.raises(ValueError, match="failed to decode image") as error:
    data.load_image_folder(root, cache_dir=tmp_path / "cache")
  assert str(bad) in str(error.value)


def test_folder_truncated_jpeg(tmp_path):
  root = _write_tree(tmp_path / "tree")
  bad = root / "test" / "ant" / "0001.jpg"
  _save_image(bad, 9, size=(4, 6))
  bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(ValueError, match="0001.jpg"):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_corrupt_image_in_tar(tmp_path):
  root = _write_tree(tmp_path / "tree")
  (root / "test" / "zebra" / "0000.png").write_bytes(b"garbage")
  archive = _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  with pytest.raises(ValueError, match="failed to decode image member") as error:
    data.load_image_folder(archive, cache_dir=tmp_path / "cache")
  message = str(error.value)
  assert "'tiny/test/zebra/0000.png'" in message
  assert str(archive) in message


def test_folder_mismatched_sizes(tmp_path):
  root = _write_tree(tmp_path / "tree")
  _save_image(root / "train" / "zebra" / "0001.png", 1, size=(5, 6))
  with pytest.raises(ValueError, match="is 5x6 \\(height x width\\) but .* is 4x6") as error:
    data.load_image_folder(root, cache_dir=tmp_path / "cache")
  assert "zebra/0001.png" in str(error.value)


def test_folder_stray_file_in_split(tmp_path):
  root = _write_tree(tmp_path / "tree")
  _save_image(root / "train" / "loose.png", 1)
  with pytest.raises(ValueError, match="unexpected file .*loose.png"):
    data.load_image_folder(root, cache_dir=tmp_path / "cache")


def test_folder_truncated_archive(tmp_path):
  root = _write_tree(tmp_path / "tree")
  archive = _write_tar(root, tmp_path / "tiny.tar.gz", top_level="tiny")
  archive.write_bytes(archive.read_bytes()[:200])
  with pytest.raises(ValueError, match="failed to read archive"):
    data.load_image_folder(archive, cache_dir=tmp_path / "cache")


def test_folder_real_cifar10_tarball():
  data_dir = os.environ.get("JAXBASE_DATA_DIR")
  if not data_dir or not os.path.exists(os.path.join(data_dir, "cifar10-jpeg.tar.gz")):
    pytest.skip(
        "set JAXBASE_DATA_DIR to the folder that contains cifar10-jpeg.tar.gz "
        "to test against the real CIFAR-10 JPEG archive"
    )
  # Uses the default cache directory. Decoding the 60,000 JPEGs took about
  # 22 s on a 2-core machine, and later runs read the cache in about 1 s.
  dataset = data.load_dataset(
      ml_collections.ConfigDict(
          {
              "source": "folder",
              "name": "cifar10",
              "path": None,
              "default_file": "cifar10-jpeg.tar.gz",
          }
      )
  )
  assert dataset.train_images.shape == (50000, 32, 32, 3)
  assert dataset.test_images.shape == (10000, 32, 32, 3)
  assert dataset.class_names[:3] == ("airplane", "automobile", "bird")
  assert dataset.num_classes == 10
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [5000] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [1000] * 10)


# TensorFlow Datasets, with no TensorFlow installed and no network.


class JaxbaseTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 3-class, 4x5 RGB data set that tfds can prepare without TensorFlow.

  tfds encodes numpy images to PNG with TensorFlow, but passes PIL images to
  Pillow, so the examples are PIL images. Pixel values encode the label as in
  the image-folder tests.
  """

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(4, 5, 3)),
                "label": tfds.features.ClassLabel(names=["cat", "dog", "eel"]),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(7), "test": self._generate_examples(4)}

  def _generate_examples(self, count):
    for index in range(count):
      label = index % 3
      image = np.full((4, 5, 3), _pixel_value(label, index), np.uint8)
      yield index, {"image": PIL.Image.fromarray(image), "label": label}


def _block_downloads(monkeypatch) -> list:
  """Make network connections and tfds download_and_prepare fail and record them."""
  attempts = []

  def reject_connect(sock, address, *args):
    attempts.append(address)
    raise AssertionError(f"network connection attempted to {address}")

  def reject_prepare(*args, **kwargs):
    attempts.append("download_and_prepare")
    raise AssertionError("tfds download_and_prepare was called")

  monkeypatch.setattr(socket.socket, "connect", reject_connect)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", reject_prepare)
  return attempts


@pytest.fixture
def no_downloads(monkeypatch):
  return _block_downloads(monkeypatch)


def _tfds_config(name, data_dir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {
          "source": "tfds",
          "name": name,
          "data_dir": str(data_dir),
          "train_split": "train",
          "test_split": "test",
      }
  )


def test_tfds_reads_prepared_array_record(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  JaxbaseTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  attempts = _block_downloads(monkeypatch)

  dataset = data.load_dataset(_tfds_config("jaxbase_tiny_images", data_dir))

  assert attempts == []
  assert dataset.class_names == ("cat", "dog", "eel")
  assert dataset.train_images.shape == (7, 4, 5, 3)
  assert dataset.test_images.shape == (4, 4, 5, 3)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.train_labels.dtype == np.int32
  # tfds shuffles records while preparing, so compare as sets of
  # (pixel value, label) pairs.
  pairs = {
      (int(image[0, 0, 0]), int(label))
      for image, label in zip(dataset.train_images, dataset.train_labels)
  }
  assert pairs == {(_pixel_value(i % 3, i), i % 3) for i in range(7)}


def test_tfds_mock_data_source(no_downloads, monkeypatch):
  # mock_data serves random records from tfds.data_source without
  # TensorFlow, but it points the builder at a nonexistent directory, so
  # is_prepared() must be patched for the loader's preparation check.
  monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)
  # NOTE: in tfds 4.9.10 the mocked __getitems__ is a plain attribute that
  # is called without `self`, so batched reads raise TypeError. This passes
  # the missing argument; the mock's _getitems ignores `self` unless
  # serialized=True.
  original_getitems = mocking._getitems
  monkeypatch.setattr(
      mocking,
      "_getitems",
      lambda record_keys, generator, serialized=False: original_getitems(
          None, record_keys, generator, serialized
      ),
  )
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    dataset = data.load_tfds("mnist", data_dir="/nonexistent/tfds")

  assert no_downloads == []
  assert dataset.train_images.shape == (12, 28, 28, 1)
  assert dataset.test_images.shape == (12, 28, 28, 1)
  assert dataset.train_images.dtype == np.uint8
  assert dataset.class_names == tuple(str(i) for i in range(10))
  assert dataset.train_labels.min() >= 0
  assert dataset.train_labels.max() < 10


def test_tfds_tfrecord_format_error(tmp_path, monkeypatch):
  # tfds cannot write tfrecord files without TensorFlow, so this simulates
  # the NotImplementedError that tfds.data_source raises for them.
  data_dir = tmp_path / "tfds"
  JaxbaseTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()

  def raise_not_implemented(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format TFRECORD")

  monkeypatch.setattr(tfds, "data_source", raise_not_implemented)
  with pytest.raises(ValueError, match="--file_format=array_record"):
    data.load_tfds("jaxbase_tiny_images", data_dir=data_dir)


def test_tfds_not_prepared_raises_without_download(tmp_path, no_downloads):
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match="not prepared") as error:
    data.load_dataset(_tfds_config("mnist", data_dir))
  message = str(error.value)
  assert f"tfds build mnist --data_dir={data_dir}" in message
  assert "--file_format=array_record" in message
  assert "[tf]" in message
  assert no_downloads == []
  assert not data_dir.exists()


def test_tfds_unknown_name(tmp_path, no_downloads):
  with pytest.raises(ValueError, match="unknown tfds data set 'no_such_set_xyz'"):
    data.load_tfds("no_such_set_xyz", data_dir=tmp_path)
  assert no_downloads == []


# Validation.


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 4, 4), np.uint8), "rank 4"),
        (np.zeros((2, 4, 4, 3), np.int32), "must be uint8 or floating point"),
        (np.zeros((2, 4, 4, 3), bool), "must be uint8 or floating point"),
        (np.full((2, 4, 4, 3), 255.0, np.float32), "min 255 and max 255; divide"),
        (np.full((2, 4, 4, 3), -0.5, np.float32), "normalization belongs in the model"),
        (np.full((2, 4, 4, 3), np.nan, np.float32), "non-finite"),
        (np.full((2, 4, 4, 3), np.inf, np.float64), "non-finite"),
    ],
)
def test_validate_images_rejects(images, message):
  with pytest.raises(ValueError, match=message):
    data.validate_images(images)


def test_validate_images_accepts():
  data.validate_images(np.full((2, 4, 4, 3), 255, np.uint8))
  data.validate_images(np.linspace(0, 1, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3))
  data.validate_images(np.zeros((0, 4, 4, 3), np.float32))
  data.validate_images(jnp.full((2, 4, 4, 3), 0.5, jnp.bfloat16))


def test_validate_images_bfloat16_range():
  with pytest.raises(ValueError, match="min 2 and max 2"):
    data.validate_images(jnp.full((2, 4, 4, 3), 2.0, jnp.bfloat16))


def test_validate_images_names_array():
  with pytest.raises(ValueError, match="^eval images must have rank 4"):
    data.validate_images(np.zeros((4, 4)), name="eval images")


def test_validate_images_nan_index():
  images = np.zeros((2, 4, 4, 3), np.float32)
  images[1, 2, 3, 0] = np.nan
  with pytest.raises(ValueError, match=r"1 non-finite .* index \(1, 2, 3, 0\)"):
    data.validate_images(images)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0.0, 1.0]), "must be integer class indices"),
        (np.zeros((2, 3), np.int32), "rank 1"),
        (np.array([0, 3, 10, 2]), r"labels\[2\] is 10, outside \[0, 10\)"),
        (np.array([0, -1, 2]), r"labels\[1\] is -1"),
    ],
)
def test_validate_labels_rejects(labels, message):
  with pytest.raises(ValueError, match=message):
    data.validate_labels(labels, 10)


def test_validate_labels_accepts():
  data.validate_labels(np.arange(10, dtype=np.int64), 10)


def test_validate_dataset_length_mismatch():
  dataset = data.ImageDataset(
      name="bad",
      train_images=np.zeros((3, 2, 2, 1), np.uint8),
      train_labels=np.zeros((2,), np.int32),
      test_images=np.zeros((1, 2, 2, 1), np.uint8),
      test_labels=np.zeros((1,), np.int32),
      class_names=("a",),
  )
  with pytest.raises(ValueError, match="bad train split has 3 images but 2 labels"):
    data.validate_dataset(dataset)


def test_validate_dataset_shape_mismatch():
  dataset = data.ImageDataset(
      name="bad",
      train_images=np.zeros((1, 2, 2, 1), np.uint8),
      train_labels=np.zeros((1,), np.int32),
      test_images=np.zeros((1, 3, 2, 1), np.uint8),
      test_labels=np.zeros((1,), np.int32),
      class_names=("a",),
  )
  with pytest.raises(ValueError, match="both splits must share one shape"):
    data.validate_dataset(dataset)


# Training batches.


def _toy_data(num_examples: int):
  # Every pixel of image n is n, so a batch shows which examples it contains.
  images = np.broadcast_to(
      np.arange(num_examples, dtype=np.int64)[:, None, None, None], (num_examples, 2, 2, 1)
  ).astype(np.float32)
  labels = np.arange(num_examples) % 7
  return images, labels


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_steps_per_epoch():
  assert data.steps_per_epoch(1797, 64) == 28
  assert data.steps_per_epoch(128, 64) == 2
  with pytest.raises(ValueError, match="larger than the data set"):
    data.steps_per_epoch(10, 64)


def test_train_batches_epoch_is_permutation():
  images, labels = _toy_data(96)
  batches = _take(data.train_batches(images, labels, global_batch_size=32, seed=3), 6)

  for epoch in range(2):
    epoch_batches = batches[3 * epoch : 3 * epoch + 3]
    ids = np.concatenate([b["images"][:, 0, 0, 0] for b in epoch_batches]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(96))
  first_order = np.concatenate([b["images"][:, 0, 0, 0] for b in batches[:3]])
  second_order = np.concatenate([b["images"][:, 0, 0, 0] for b in batches[3:]])
  assert not np.array_equal(first_order, second_order)


def test_train_batches_shapes_and_labels():
  images, labels = _toy_data(100)
  batch = next(data.train_batches(images, labels, global_batch_size=16, seed=0))
  assert batch["images"].shape == (16, 2, 2, 1)
  assert batch["images"].dtype == np.float32
  assert batch["labels"].dtype == np.int32
  ids = batch["images"][:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(batch["labels"], ids % 7)


def test_train_batches_drops_remainder():
  images, labels = _toy_data(100)
  batches = _take(data.train_batches(images, labels, global_batch_size=32, seed=1), 3)
  ids = np.concatenate([b["images"][:, 0, 0, 0] for b in batches]).astype(int)
  assert len(np.unique(ids)) == 96
  expected = np.random.default_rng([1, 0]).permutation(100)[:96]
  np.testing.assert_array_equal(ids, expected)


def test_train_batches_resume_matches_skip():
  images, labels = _toy_data(50)
  fresh = _take(data.train_batches(images, labels, global_batch_size=8, seed=5), 20)
  for start in (0, 3, 6, 7, 13):
    resumed = _take(
        data.train_batches(images, labels, global_batch_size=8, seed=5, start_step=start),
        20 - start,
    )
    for offset, batch in enumerate(resumed):
      np.testing.assert_array_equal(batch["images"], fresh[start + offset]["images"])
      np.testing.assert_array_equal(batch["labels"], fresh[start + offset]["labels"])


def test_train_batches_seed_changes_order():
  images, labels = _toy_data(64)
  first = next(data.train_batches(images, labels, global_batch_size=16, seed=0))
  second = next(data.train_batches(images, labels, global_batch_size=16, seed=1))
  assert not np.array_equal(first["images"], second["images"])


def test_train_batches_process_shards_concatenate():
  images, labels = _toy_data(90)
  single = _take(data.train_batches(images, labels, global_batch_size=12, seed=2), 16)
  for count in (2, 3, 4):
    shards = [
        _take(
            data.train_batches(
                images,
                labels,
                global_batch_size=12,
                seed=2,
                process_index=index,
                process_count=count,
            ),
            16,
        )
        for index in range(count)
    ]
    for step in range(16):
      joined = np.concatenate([shards[p][step]["images"] for p in range(count)])
      np.testing.assert_array_equal(joined, single[step]["images"])
      assert shards[0][step]["images"].shape[0] == 12 // count


def test_train_batches_checks_arguments_eagerly():
  images, labels = _toy_data(20)
  with pytest.raises(ValueError, match="not divisible by process_count 3"):
    data.train_batches(images, labels, global_batch_size=8, seed=0, process_count=3)
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 2\)"):
    data.train_batches(
        images, labels, global_batch_size=8, seed=0, process_index=2, process_count=2
    )
  with pytest.raises(ValueError, match="larger than the data set"):
    data.train_batches(images, labels, global_batch_size=32, seed=0)
  with pytest.raises(ValueError, match="differ in length"):
    data.train_batches(images, labels[:5], global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="start_step must be non-negative"):
    data.train_batches(images, labels, global_batch_size=4, seed=0, start_step=-1)


# Evaluation batches.


@pytest.mark.parametrize(
    "num_examples, global_batch_size, process_count",
    [
        (1797, 64, 1),
        (1797, 63, 3),
        (10, 64, 4),
        (128, 64, 2),
        (5, 6, 3),
    ],
)
def test_eval_batches_cover_each_example_once(num_examples, global_batch_size, process_count):
  images, labels = _toy_data(num_examples)
  expected_batches = data.num_eval_batches(num_examples, global_batch_size)
  local = global_batch_size // process_count

  real_ids = []
  total_mask = 0.0
  for index in range(process_count):
    batches = list(
        data.eval_batches(
            images,
            labels,
            global_batch_size=global_batch_size,
            process_index=index,
            process_count=process_count,
        )
    )
    assert len(batches) == expected_batches
    for batch in batches:
      assert batch["images"].shape == (local, 2, 2, 1)
      assert batch["labels"].shape == (local,)
      assert batch["mask"].dtype == np.float32
      real = batch["mask"] == 1.0
      total_mask += batch["mask"].sum()
      real_ids.extend(batch["images"][real, 0, 0, 0].astype(int).tolist())
      np.testing.assert_array_equal(
          batch["labels"][real], batch["images"][real, 0, 0, 0].astype(int) % 7
      )
      assert np.all(batch["images"][~real] == 0)
      assert np.all(batch["labels"][~real] == 0)

  assert total_mask == num_examples
  assert sorted(real_ids) == list(range(num_examples))


def test_num_eval_batches():
  assert data.num_eval_batches(1797, 64) == 29
  assert data.num_eval_batches(128, 64) == 2
  assert data.num_eval_batches(0, 64) == 0


def test_eval_batches_keep_uint8():
  images = np.full((3, 2, 2, 1), 7, np.uint8)
  batch = next(data.eval_batches(images, np.zeros(3, np.int64), global_batch_size=4))
  assert batch["images"].dtype == np.uint8
  assert batch["labels"].dtype == np.int32
  np.testing.assert_array_equal(batch["mask"], [1, 1, 1, 0])


@pytest.mark.parametrize("mode, suffix", [("w:gz", "tar.gz"), ("w:xz", "tar.xz"), ("w", "tar")])
def test_folder_truncated_archive_rejected_wherever_cut(tmp_path, mode, suffix):
  root = _write_tree(tmp_path / "tree")
  whole = tmp_path / f"whole.{suffix}"
  with tarfile.open(whole, mode) as tar:
    tar.add(root, arcname=".")
  content = whole.read_bytes()
  # Cuts within the data; the zero padding at the end of a plain tar contains none.
  data_end = len(content.rstrip(b"\0"))
  # A cut at a member boundary used to read as a smaller archive missing a split.
  for fraction in (0.3, 0.5, 0.7, 0.9, 0.99):
    cut = tmp_path / f"cut{fraction}.{suffix}"
    cut.write_bytes(content[: int(data_end * fraction)])
    with pytest.raises(ValueError, match="the file may be truncated") as error:
      data.load_image_folder(cut, cache_dir=tmp_path / "cache")
    assert str(cut) in str(error.value)
  images = data.load_image_folder(whole, cache_dir=tmp_path / "cache")
  assert len(images.train_labels) == len(_TREE_CLASSES) * _TRAIN_PER_CLASS
