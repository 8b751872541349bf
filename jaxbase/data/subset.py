"""Restrict an image data set to some classes and a number of labelled training examples.

The transfer-learning lever pretrains on some CIFAR-10 classes and fine-tunes
on the others with few labels; sweeps and budgets train on a subset. Both are
config choices (`data.classes`, `data.num_train_examples`) applied after
loading, so every source supports them.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxbase.data.sources import ImageDataset


def select_classes(dataset: ImageDataset, classes: Sequence[int | str]) -> ImageDataset:
  """Keeps only `classes` (indices or names) in both splits, relabelled 0 .. len(classes) - 1.

  The new label of a class is its position in `classes`, so `classes=(5, 6)`
  turns class 5 into 0 and class 6 into 1.

  Raises:
    ValueError: on an unknown or repeated class, or an empty list.
  """
  if not classes:
    raise ValueError("data.classes is empty; list at least two classes, or leave it unset")
  indices = []
  for item in classes:
    if isinstance(item, str):
      if item not in dataset.class_names:
        raise ValueError(
            f"data.classes names {item!r}, which is not a class of {dataset.name}; "
            f"classes: {', '.join(dataset.class_names)}"
        )
      indices.append(dataset.class_names.index(item))
    else:
      index = int(item)
      if not 0 <= index < dataset.num_classes:
        raise ValueError(
            f"data.classes has {index}, outside 0..{dataset.num_classes - 1} for {dataset.name}"
        )
      indices.append(index)
  if len(set(indices)) != len(indices):
    raise ValueError(f"data.classes repeats a class: {list(classes)}")

  mapping = np.full(dataset.num_classes, -1, np.int32)
  mapping[indices] = np.arange(len(indices), dtype=np.int32)

  def keep(images, labels):
    mask = mapping[labels] >= 0
    return images[mask], mapping[labels[mask]]

  train_images, train_labels = keep(dataset.train_images, dataset.train_labels)
  test_images, test_labels = keep(dataset.test_images, dataset.test_labels)
  return dataclasses.replace(
      dataset,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=tuple(dataset.class_names[i] for i in indices),
  )


def select_train_examples(dataset: ImageDataset, count: int, seed: int) -> ImageDataset:
  """Keeps `count` training examples, drawn without replacement and stratified by class.

  Each class keeps its share of `count` (rounded, then adjusted so the total
  is exact), so a 10% subset keeps the class balance. The draw depends only
  on `seed`, so the same config always trains on the same examples. The test
  split is unchanged.

  Raises:
    ValueError: when `count` is not positive or exceeds the training split.
  """
  total = len(dataset.train_labels)
  if not 0 < count <= total:
    raise ValueError(
        f"data.num_train_examples={count} must be in 1..{total} for {dataset.name} "
        "(0 keeps the whole training split)"
    )
  rng = np.random.default_rng(seed)
  classes, counts = np.unique(dataset.train_labels, return_counts=True)
  quotas = np.floor(counts * count / total).astype(int)
  # Hand out what rounding down left, to the classes with the largest remainders.
  remainders = counts * count / total - quotas
  for index in np.argsort(-remainders, kind="stable")[: count - quotas.sum()]:
    quotas[index] += 1

  chosen = []
  for label, quota in zip(classes, quotas):
    members = np.flatnonzero(dataset.train_labels == label)
    chosen.append(rng.choice(members, size=quota, replace=False))
  chosen = np.sort(np.concatenate(chosen))
  return dataclasses.replace(
      dataset,
      train_images=dataset.train_images[chosen],
      train_labels=dataset.train_labels[chosen],
  )
