"""Host-side batch iterators, per-process sharding, eval padding and input checks.

Batches are numpy arrays built on the host. Training batches follow a fixed
schedule derived from a seed, so a run restarted at step `s` reads exactly the
batches an uninterrupted run reads from step `s` on. In multi-process runs each
process reads only its own rows of every global batch;
`jaxbase.train.parallel.DataParallel.shard_batch` then assembles those rows
into global device arrays.
"""

from collections.abc import Iterator
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

Batch = dict[str, np.ndarray]


def validate_images(images, *, name: str = "images") -> None:
  """Raise ValueError unless `images` is a valid NHWC image array.

  Accepted: rank 4 `[batch, height, width, channels]`, either uint8 (any
  value) or floating point with every value finite and in [0, 1]. Values
  outside [0, 1] usually mean the data was not scaled or was already
  normalized, and normalization belongs in the model.

  Args:
    images: Array of shape [batch, height, width, channels].
    name: Name of the array in error messages.

  Raises:
    ValueError: On a wrong rank, a dtype other than uint8 or floating point,
      non-finite values, or floating-point values outside [0, 1].
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(
        f"{name} must have rank 4 [batch, height, width, channels], got shape "
        f"{images.shape}; add a channel axis to grayscale images "
        "(images[..., None])"
    )
  if images.dtype == np.uint8:
    return
  # jnp.issubdtype also counts bfloat16, which numpy treats as a void type.
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"{name} must be uint8 or floating point in [0, 1], got {images.dtype}; "
        "convert 8-bit data with images.astype(np.uint8)"
    )
  if images.size == 0:
    return

  num_nonfinite = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
  if num_nonfinite:
    first = np.unravel_index(np.argmin(np.isfinite(images)), images.shape)
    raise ValueError(
        f"{name} contains {num_nonfinite} non-finite values (NaN or inf), the "
        f"first at index {tuple(int(i) for i in first)}; fix or drop those "
        "examples"
    )

  low = float(images.min())
  high = float(images.max())
  if low < 0.0 or high > 1.0:
    raise ValueError(
        f"{name} must be {images.dtype} in [0, 1], got min {low:g} and max "
        f"{high:g}; divide 8-bit data by 255, and pass unnormalized data if it "
        "was normalized (mean/std normalization belongs in the model)"
    )


def validate_labels(labels, num_classes: int, *, name: str = "labels") -> None:
  """Raise ValueError unless `labels` are class indices in [0, num_classes).

  Args:
    labels: Integer array of shape [batch].
    num_classes: Number of classes, at least 1.
    name: Name of the array in error messages.

  Raises:
    ValueError: On a non-integer dtype, a rank other than 1, or a label
      outside [0, num_classes). The message names the first offending index
      and its value.
  """
  if int(num_classes) < 1:
    raise ValueError(f"num_classes must be at least 1, got {num_classes}")
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
        f"{name} must be integer class indices, got dtype {labels.dtype}; "
        "convert one-hot labels with argmax(axis=-1)"
    )
  if labels.ndim != 1:
    raise ValueError(f"{name} must have rank 1 [batch], got shape {labels.shape}")

  out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if out_of_range.size:
    index = int(out_of_range[0])
    raise ValueError(
        f"{name}[{index}] is {int(labels[index])}, outside [0, {num_classes}) "
        f"({out_of_range.size} labels out of range in total); check the "
        "number of classes or the label mapping"
    )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Return the number of full global batches in one epoch.

  The last partial batch is dropped.

  Args:
    num_examples: Number of examples in the data set.
    global_batch_size: Examples per step, summed over all processes.

  Returns:
    `num_examples // global_batch_size`, at least 1.

  Raises:
    ValueError: If the batch size is not positive or is larger than the
      data set.
  """
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
  steps = num_examples // global_batch_size
  if steps == 0:
    raise ValueError(
        f"global_batch_size {global_batch_size} is larger than the data set "
        f"({num_examples} examples), so an epoch has no full batch; lower "
        "the batch size"
    )
  return steps


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  """Return the rows per process of a global batch, after checking the args."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
  if process_count < 1:
    raise ValueError(f"process_count must be at least 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size {global_batch_size} is not divisible by "
        f"process_count {process_count}; use a multiple of {process_count}"
    )
  return global_batch_size // process_count


def _check_same_length(images: np.ndarray, labels: np.ndarray) -> None:
  if len(images) != len(labels):
    raise ValueError(
        f"images and labels differ in length: {len(images)} images, {len(labels)} labels"
    )


def train_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
  """Return an infinite iterator of shuffled training batches from `start_step`.

  Epoch `e` visits the examples in the order
  `np.random.default_rng([seed, e]).permutation(num_examples)` and drops the
  last partial batch. Step `s` is batch `s % steps_per_epoch` of epoch
  `s // steps_per_epoch`, so the batches from `start_step=k` on equal those an
  iterator started at step 0 yields after k steps. Process `p` receives rows
  `[p * local, (p + 1) * local)` of each global batch, where
  `local = global_batch_size // process_count`.

  Args:
    images: Array of shape [num_examples, height, width, channels].
    labels: Integer array of shape [num_examples].
    global_batch_size: Examples per step, summed over all processes.
    seed: Non-negative shuffle seed.
    start_step: First step to yield, for resuming a run.
    process_index: Index of this process, `jax.process_index()`.
    process_count: Number of processes, `jax.process_count()`.

  Returns:
    An infinite iterator of dicts with 'images' of shape [local, height,
    width, channels] in the dtype of `images` and 'labels' int32 of shape
    [local].

  Raises:
    ValueError: On mismatched lengths, a negative seed or start step, a
      batch size larger than the data set or not divisible by
      `process_count`, or a process index out of range. The checks run
      when the function is called, before the first batch is requested.
  """
  _check_same_length(images, labels)
  return train_batches_from_arrays(
      {"images": images, "labels": np.asarray(labels, dtype=np.int32)},
      global_batch_size=global_batch_size,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
  )


def _num_rows(arrays: dict[str, np.ndarray]) -> int:
  """Return the common first-axis length of `arrays`, or raise if they differ."""
  lengths = {name: len(array) for name, array in arrays.items()}
  if not lengths:
    raise ValueError("no arrays to batch")
  if len(set(lengths.values())) != 1:
    raise ValueError(f"arrays to batch differ in length: {lengths}")
  return next(iter(lengths.values()))


class SequenceTrim(NamedTuple):
  """Cuts token arrays to the longest sequence of each batch (dynamic padding).

  Text data is stored padded to the model's maximum length, but most
  sentences are much shorter. With a `SequenceTrim`, the batch iterators cut
  the arrays named in `keys` along axis 1 to the longest real sequence of the
  global batch, rounded up to a multiple of `multiple`. The columns cut contain
  padding only, so a model with a padding mask computes the same logits.
  Every process of a multi-process run cuts its rows to the same width.
  Each distinct width compiles the step once more, so `multiple` bounds the
  number of compilations to `max_length / multiple`.

  `sort_window` > 1 additionally groups sentences of similar length into the
  same batch: each epoch's shuffled order is cut into windows of
  `sort_window` global batches, each window is sorted by length and cut into
  batches, and the epoch's batches are then shuffled, so short and long
  batches alternate in random order. The examples seen in an epoch are the
  same as without sorting.

  Attributes:
    lengths: int[num_examples], the number of real (non-padding) positions of
      each row; `sequence_lengths` computes it from a padding mask.
    multiple: widths are rounded up to a multiple of this.
    sort_window: global batches per length-sorted window; 0 or 1 keeps the
      plain shuffled order.
    keys: names of the arrays to cut along axis 1; missing names are ignored.
  """

  lengths: np.ndarray
  multiple: int = 8
  sort_window: int = 0
  keys: tuple[str, ...] = ("token_ids", "padding_mask", "segment_ids")


def sequence_lengths(padding_mask: np.ndarray) -> np.ndarray:
  """Return the position after the last real token of each row of a padding mask.

  Args:
    padding_mask: [num_examples, length], nonzero at real tokens.

  Returns:
    int64[num_examples]; 0 for rows without real tokens.
  """
  padding_mask = np.asarray(padding_mask).astype(bool)
  if padding_mask.ndim != 2:
    raise ValueError(f"padding_mask must have rank 2 [examples, length], got {padding_mask.shape}")
  last = padding_mask.shape[1] - np.argmax(padding_mask[:, ::-1], axis=1)
  return np.where(padding_mask.any(axis=1), last, 0).astype(np.int64)


def _check_trim(trim: SequenceTrim | None, num_examples: int) -> None:
  if trim is None:
    return
  if len(trim.lengths) != num_examples:
    raise ValueError(
        f"SequenceTrim.lengths has {len(trim.lengths)} rows, but the arrays have {num_examples}"
    )
  if int(trim.multiple) < 1:
    raise ValueError(f"SequenceTrim.multiple must be >= 1, got {trim.multiple}")
  if int(trim.sort_window) < 0:
    raise ValueError(f"SequenceTrim.sort_window must be >= 0, got {trim.sort_window}")


def _full_width(arrays: dict[str, np.ndarray], trim: SequenceTrim) -> int:
  """Return the stored width of the arrays that `trim` cuts."""
  return max((array.shape[1] for name, array in arrays.items() if name in trim.keys), default=0)


def _trim_width(trim: SequenceTrim | None, global_rows: np.ndarray, full_width: int) -> int | None:
  """Return the width the rows `global_rows` of a global batch are cut to, or None without `trim`."""
  if trim is None:
    return None
  longest = int(trim.lengths[global_rows].max())
  multiple = int(trim.multiple)
  return min(full_width, max(multiple, -(-longest // multiple) * multiple))


def _cut(batch: Batch, trim: SequenceTrim | None, width: int | None) -> Batch:
  if trim is None:
    return batch
  return {
      name: array[:, :width] if name in trim.keys and array.ndim >= 2 else array
      for name, array in batch.items()
  }


def train_batches_from_arrays(
    arrays: dict[str, np.ndarray],
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    trim: SequenceTrim | None = None,
) -> Iterator[Batch]:
  """Return `train_batches` for any dict of arrays that share their first axis.

  Every array is indexed with the same rows, in the order and sharding that
  `train_batches` documents, e.g. 'token_ids', 'padding_mask' and 'labels'
  of a text data set.

  Args:
    trim: cut token arrays to each batch's longest sequence and optionally
      group sentences of similar length (see `SequenceTrim`); None keeps the
      arrays' full width and the plain shuffled order.

  Returns:
    An infinite iterator of dicts with the keys of `arrays` and `local` rows.

  Raises:
    ValueError: As `train_batches`, on arrays of different lengths, and on a
      `trim` that does not fit the arrays.
  """
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  num_examples = _num_rows(arrays)
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  if start_step < 0:
    raise ValueError(f"start_step must be non-negative, got {start_step}")
  _check_trim(trim, num_examples)
  num_steps = steps_per_epoch(num_examples, global_batch_size)
  return _generate_train_batches(
      arrays,
      global_batch_size,
      seed,
      start_step,
      process_index * local_batch,
      local_batch,
      num_steps,
      trim,
  )


def _epoch_rows(
    num_examples: int,
    global_batch_size: int,
    num_steps: int,
    seed: int,
    epoch: int,
    trim: SequenceTrim | None,
) -> np.ndarray:
  """Return the rows of every global batch of `epoch`, int[num_steps, global_batch_size]."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  rows = order[: num_steps * global_batch_size].reshape(num_steps, global_batch_size)
  window = int(trim.sort_window) if trim is not None else 0
  if window <= 1:
    return rows
  for first in range(0, num_steps, window):
    block = rows[first : first + window].reshape(-1)
    block = block[np.argsort(trim.lengths[block], kind="stable")]
    rows[first : first + window] = block.reshape(-1, global_batch_size)
  batch_order = np.random.default_rng([seed, epoch, 1]).permutation(num_steps)
  return rows[batch_order]


def _generate_train_batches(
    arrays: dict[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    start_step: int,
    row_offset: int,
    local_batch: int,
    num_steps: int,
    trim: SequenceTrim | None,
) -> Iterator[Batch]:
  num_examples = _num_rows(arrays)
  full_width = _full_width(arrays, trim) if trim is not None else 0
  step = start_step
  epoch = -1
  rows = None
  while True:
    if step // num_steps != epoch:
      epoch = step // num_steps
      rows = _epoch_rows(num_examples, global_batch_size, num_steps, seed, epoch, trim)
    global_rows = rows[step % num_steps]
    indices = global_rows[row_offset : row_offset + local_batch]
    width = _trim_width(trim, global_rows, full_width)
    yield _cut({name: array[indices] for name, array in arrays.items()}, trim, width)
    step += 1


def select_subset(
    arrays: dict[str, np.ndarray], num_examples: int, seed: int
) -> dict[str, np.ndarray]:
  """Keep `num_examples` rows chosen at random from `seed`, in their original order.

  The rows are the first `num_examples` of a permutation drawn from
  `np.random.SeedSequence(seed, spawn_key=(1,))`, a stream separate from the
  per-epoch shuffles of `train_batches`, so runs with the same seed and size
  train on the same examples.

  Raises:
    ValueError: if `num_examples` is not in [1, number of rows].
  """
  total = _num_rows(arrays)
  if not 1 <= num_examples <= total:
    raise ValueError(f"cannot select {num_examples} of {total} examples; pick 1 to {total}")
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
  rows = np.sort(rng.permutation(total)[:num_examples])
  return {name: array[rows] for name, array in arrays.items()}


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
  """Return the number of batches `eval_batches` yields on every process.

  Args:
    num_examples: Number of examples in the evaluation set.
    global_batch_size: Examples per step, summed over all processes.

  Returns:
    `ceil(num_examples / global_batch_size)`. The last batch is padded.

  Raises:
    ValueError: If the batch size is not positive.
  """
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
  return -(-num_examples // global_batch_size)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
  """Return an iterator over every example once, in order, in padded batches.

  Global batch `b` covers examples `[b * global_batch_size, (b + 1) *
  global_batch_size)`, and process `p` takes its rows `[p * local, (p + 1) *
  local)` of it, as in `train_batches`. Rows past the end of the data set are
  padding: zero images, label 0 and mask 0. Every process yields
  `num_eval_batches(len(images), global_batch_size)` batches of the same
  shape, so all processes run the same number of jitted steps even when a
  process holds only padding. Sum `mask`-weighted metrics and divide by
  `mask.sum()`.

  Args:
    images: Array of shape [num_examples, height, width, channels].
    labels: Integer array of shape [num_examples].
    global_batch_size: Examples per step, summed over all processes.
    process_index: Index of this process, `jax.process_index()`.
    process_count: Number of processes, `jax.process_count()`.

  Returns:
    An iterator of dicts with 'images' [local, height, width, channels] in
    the dtype of `images`, 'labels' int32 [local] and 'mask' float32 [local],
    1 for real examples and 0 for padding.

  Raises:
    ValueError: On mismatched lengths, a batch size not divisible by
      `process_count`, or a process index out of range. The checks run
      when the function is called, before the first batch is requested.
  """
  _check_same_length(images, labels)
  return eval_batches_from_arrays(
      {"images": images, "labels": np.asarray(labels, np.int32)},
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
  )


def eval_batches_from_arrays(
    arrays: dict[str, np.ndarray],
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    trim: SequenceTrim | None = None,
) -> Iterator[Batch]:
  """Return `eval_batches` for any dict of arrays that share their first axis.

  Padding rows are zeros in every array (for text, [PAD] ids and a zero
  padding mask), and the added 'mask' marks real rows.

  Args:
    trim: cut token arrays to each batch's longest sequence (see
      `SequenceTrim`; its `sort_window` is ignored, the order stays fixed).

  Raises:
    ValueError: As `eval_batches`, on arrays of different lengths, on a
      `trim` that does not fit the arrays, or on an array named 'mask',
      which would collide with the validity mask.
  """
  if "mask" in arrays:
    raise ValueError("an array named 'mask' collides with the eval validity mask; rename it")
  local_batch = _local_batch_size(global_batch_size, process_index, process_count)
  num_examples = _num_rows(arrays)
  _check_trim(trim, num_examples)
  return _generate_eval_batches(
      arrays, num_examples, global_batch_size, process_index * local_batch, local_batch, trim
  )


def _generate_eval_batches(
    arrays: dict[str, np.ndarray],
    num_examples: int,
    global_batch_size: int,
    row_offset: int,
    local_batch: int,
    trim: SequenceTrim | None,
) -> Iterator[Batch]:
  full_width = _full_width(arrays, trim) if trim is not None else 0
  for batch_index in range(num_eval_batches(num_examples, global_batch_size)):
    start = batch_index * global_batch_size + row_offset
    stop = min(start + local_batch, num_examples)
    num_real = max(stop - start, 0)

    batch = {}
    for name, array in arrays.items():
      padded = np.zeros((local_batch,) + array.shape[1:], array.dtype)
      if num_real:
        padded[:num_real] = array[start:stop]
      batch[name] = padded
    mask = np.zeros((local_batch,), np.float32)
    mask[:num_real] = 1.0
    batch["mask"] = mask
    first = batch_index * global_batch_size
    global_rows = np.arange(first, min(first + global_batch_size, num_examples))
    width = _trim_width(trim, global_rows, full_width)
    yield _cut(batch, trim, width)
