"""Tests for class and training-example subsets of an image data set."""

import numpy as np
import pytest

from jaxbase.data import subset
from jaxbase.data.sources import ImageDataset


def _dataset():
  rng = np.random.default_rng(0)
  train_labels = np.repeat(np.arange(4), [40, 30, 20, 10]).astype(np.int32)
  test_labels = np.tile(np.arange(4), 5).astype(np.int32)
  # Each image stores its own index, so a subset can be traced back.
  train_images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1) * np.ones(
      (1, 2, 2, 1), np.uint8
  )
  test_images = rng.integers(0, 256, (20, 2, 2, 1), dtype=np.uint8)
  return ImageDataset(
      "toy", train_images, train_labels, test_images, test_labels, ("a", "b", "c", "d")
  )


def test_select_classes_relabels_in_given_order():
  dataset = subset.select_classes(_dataset(), ["c", 1])
  assert dataset.class_names == ("c", "b")
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [20, 30])
  np.testing.assert_array_equal(np.bincount(dataset.test_labels), [5, 5])
  # Training images 70..89 were class 'c' (label 2), now label 0.
  np.testing.assert_array_equal(
      dataset.train_images[dataset.train_labels == 0, 0, 0, 0], np.arange(70, 90)
  )


@pytest.mark.parametrize(
    "classes, message",
    [
        (["e"], "not a class of toy"),
        ([7], "outside 0..3"),
        ([1, "b"], "repeats a class"),
        ([], "empty"),
    ],
)
def test_select_classes_rejects_bad_lists(classes, message):
  with pytest.raises(ValueError, match=message):
    subset.select_classes(_dataset(), classes)


def test_select_train_examples_is_stratified_and_exact():
  dataset = subset.select_train_examples(_dataset(), 10, seed=3)
  assert len(dataset.train_labels) == 10
  np.testing.assert_array_equal(np.bincount(dataset.train_labels), [4, 3, 2, 1])
  # Labels still match their images (image value = original index).
  original = _dataset()
  indices = dataset.train_images[:, 0, 0, 0]
  np.testing.assert_array_equal(original.train_labels[indices], dataset.train_labels)
  assert len(np.unique(indices)) == 10
  np.testing.assert_array_equal(dataset.test_labels, original.test_labels)


def test_select_train_examples_depends_only_on_seed():
  first = subset.select_train_examples(_dataset(), 7, seed=1).train_images
  again = subset.select_train_examples(_dataset(), 7, seed=1).train_images
  other = subset.select_train_examples(_dataset(), 7, seed=2).train_images
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert len(first) == 7


@pytest.mark.parametrize("count", [0, -1, 101])
def test_select_train_examples_rejects_bad_counts(count):
  with pytest.raises(ValueError, match="num_train_examples"):
    subset.select_train_examples(_dataset(), count, seed=0)
