"""Reader for the IDX format of MNIST and Fashion-MNIST.

An IDX file starts with a big-endian magic number `0x0000TTDD` (TT: element
type, 0x08 for unsigned bytes; DD: number of dimensions), then one big-endian
uint32 per dimension, then the elements. Files may be gzip-compressed.
Debian's `dataset-fashion-mnist` package installs the four Fashion-MNIST files
in /usr/share/datasets/fashion-mnist.
"""

import gzip
import os

import numpy as np

_UBYTE = 0x08
# Train and test file stems of the MNIST family.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def read_idx(path: str) -> np.ndarray:
  """Reads an unsigned-byte IDX file (optionally .gz) into a uint8 array.

  Raises:
    ValueError: when the header is not an unsigned-byte IDX header or the file
      is shorter than its header specifies.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      content = f.read()
  except (OSError, EOFError) as error:
    raise ValueError(
        f"failed to read IDX file {path}: {error}; the file may be truncated"
    ) from error
  if len(content) < 4 or content[0] != 0 or content[1] != 0 or content[2] != _UBYTE:
    raise ValueError(
        f"{path} is not an unsigned-byte IDX file (magic bytes {content[:4].hex()}, expected "
        "0000 08 followed by the number of dimensions)"
    )
  num_dims = content[3]
  header_size = 4 + 4 * num_dims
  shape = tuple(int(d) for d in np.frombuffer(content[4:header_size], dtype=">u4"))
  expected = header_size + int(np.prod(shape))
  if len(content) != expected:
    raise ValueError(
        f"{path} has {len(content)} bytes but its header {shape} needs {expected}; the file "
        "is truncated or corrupt"
    )
  return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


def _find(directory: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{stem}[.gz] not found in {directory}; point data.path at a folder with the four "
      "MNIST-style IDX files (on Debian: apt-get install dataset-fashion-mnist, then "
      "data.path=/usr/share/datasets/fashion-mnist)"
  )


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split as (uint8 images [n, height, width, 1], int32 labels [n])."""
  if split not in SPLIT_FILES:
    raise ValueError(f"unknown IDX split {split!r}; use one of: {', '.join(SPLIT_FILES)}")
  image_stem, label_stem = SPLIT_FILES[split]
  images_path, labels_path = _find(directory, image_stem), _find(directory, label_stem)
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or labels.ndim != 1:
    raise ValueError(
        f"{images_path} must hold [n, height, width] and {labels_path} [n]; got "
        f"{images.shape} and {labels.shape}"
    )
  if len(images) != len(labels):
    raise ValueError(
        f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
    )
  return images[..., None], labels.astype(np.int32)
