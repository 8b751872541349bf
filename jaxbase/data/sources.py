"""Loaders that read image classification data sets into memory as numpy arrays.

`load_dataset(config)` dispatches on `config.source`:

- 'digits': scikit-learn's bundled 8x8 handwritten digits. Needs no files,
  so it suits smoke tests and examples.
- 'folder': an image-folder tree `ROOT/{split}/{class}/{image}` on disk or in
  a tar archive, decoded once with Pillow and cached as a `.npz` file.
- 'tfds': a TensorFlow Datasets data set already prepared in array_record
  format, read with `tfds.data_source`, which needs no TensorFlow.
- 'idx': MNIST-style IDX files.
- 'tsv', 'tfds_text': text classification sentences, returned as a
  `text.TextDataset` for the caller to tokenize (see `jaxbase.data.text`).

Every loader returns uint8 NHWC images and int32 labels, and `load_dataset`
validates both splits before returning them.
"""

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator

from absl import logging
import ml_collections
import numpy as np
import PIL.Image
import tqdm

from jaxbase.data import idx
from jaxbase.data import pipeline
from jaxbase.data import text

SOURCES = ("digits", "folder", "tfds", "idx") + text.TEXT_SOURCES
# Folder of the IDX files that Debian's dataset-fashion-mnist package installs.
DEFAULT_IDX_PATH = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "JAXBASE_DATA_DIR"
CACHE_DIR_ENV = "JAXBASE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/jaxbase"

# Bump when the cached arrays change meaning, so that old cache files are not
# reused.
_CACHE_VERSION = 1
# Records read per `__getitems__` call from a tfds data source.
_TFDS_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An image classification data set held in host memory.

  Attributes:
    name: Data set name, used in logs and cache file names.
    train_images: uint8 [n_train, height, width, channels].
    train_labels: int32 [n_train], class indices into `class_names`.
    test_images: uint8 [n_test, height, width, channels].
    test_labels: int32 [n_test].
    class_names: Class names, in label order.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    """Number of classes."""
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Shape of one image, (height, width, channels)."""
    return tuple(self.train_images.shape[1:])

  @property
  def train_arrays(self) -> dict[str, np.ndarray]:
    """The train split as batchable arrays: 'images' and 'labels'."""
    return {"images": self.train_images, "labels": self.train_labels}

  @property
  def test_arrays(self) -> dict[str, np.ndarray]:
    """The test split as batchable arrays: 'images' and 'labels'."""
    return {"images": self.test_images, "labels": self.test_labels}


def load_dataset(config: ml_collections.ConfigDict) -> ImageDataset | text.TextDataset:
  """Load the data set described by the `data` section of a run config.

  Fields read:
    source: 'digits', 'folder', 'tfds', 'idx', or a text source ('tsv',
      'tfds_text'; see `text.load_text_dataset` for their fields).
    name: tfds data set name (e.g. 'cifar10'); for 'folder', the data set
      name, defaulting to the file or folder name.
    data_dir: tfds data directory; None uses tfds's default.
    path: 'folder' only: a directory or tar archive. None means
      `$JAXBASE_DATA_DIR/{default_file}`.
    default_file: 'folder' only: the file name looked up in
      `$JAXBASE_DATA_DIR` when `path` is None.
    train_split, test_split: split names, 'train' and 'test' by default.
    cache_dir: 'folder' only: where decoded arrays are cached; defaults to
      `$JAXBASE_CACHE_DIR`, else `~/.cache/jaxbase`.

  Args:
    config: The `data` config.

  Returns:
    The data set, with both splits validated; a `text.TextDataset` of
    sentences for text sources.

  Raises:
    ValueError: If the source is unknown or the data is invalid.
    FileNotFoundError: If files or a prepared tfds data set are missing.
  """
  source = config.get("source")
  if source in text.TEXT_SOURCES:
    return text.load_text_dataset(config)
  train_split = config.get("train_split", "train")
  test_split = config.get("test_split", "test")

  if source == "digits":
    dataset = load_digits()
  elif source == "folder":
    dataset = load_image_folder(
        resolve_folder_path(config),
        name=config.get("name"),
        train_split=train_split,
        test_split=test_split,
        cache_dir=config.get("cache_dir"),
    )
  elif source == "tfds":
    dataset = load_tfds(
        config.get("name"),
        data_dir=config.get("data_dir"),
        train_split=train_split,
        test_split=test_split,
    )
  elif source == "idx":
    dataset = load_idx(
        config.get("path") or DEFAULT_IDX_PATH,
        name=config.get("name") or "fashion_mnist",
        class_names=config.get("class_names"),
    )
  else:
    raise ValueError(
        f"unknown data source {source!r}; set data.source to one of {', '.join(SOURCES)}"
    )

  validate_dataset(dataset)
  return dataset


def validate_dataset(dataset: ImageDataset) -> None:
  """Raise ValueError unless both splits hold valid, matching images and labels.

  Args:
    dataset: The data set to check.

  Raises:
    ValueError: On an empty split, on invalid images or labels (see
      `pipeline.validate_images` and `pipeline.validate_labels`), on images
      and labels of different lengths, or on train and test images of
      different shapes.
  """
  splits = (
      ("train", dataset.train_images, dataset.train_labels),
      ("test", dataset.test_images, dataset.test_labels),
  )
  for split, images, labels in splits:
    if len(images) == 0:
      raise ValueError(
          f"the {split} split of {dataset.name} is empty; check data.{split}_split and the "
          "files it names"
      )
    pipeline.validate_images(images, name=f"{dataset.name} {split} images")
    pipeline.validate_labels(labels, dataset.num_classes, name=f"{dataset.name} {split} labels")
    if len(images) != len(labels):
      raise ValueError(
          f"{dataset.name} {split} split has {len(images)} images but {len(labels)} labels"
      )
  if dataset.train_images.shape[1:] != dataset.test_images.shape[1:]:
    raise ValueError(
        f"{dataset.name} train images have shape "
        f"{dataset.train_images.shape[1:]} but test images have shape "
        f"{dataset.test_images.shape[1:]}; both splits must share one shape"
    )


# Digits.


def load_digits() -> ImageDataset:
  """Load scikit-learn's 8x8 handwritten digits with a fixed stratified split.

  The 1,797 images (values 0..16) are scaled to uint8 with
  `round(v * 255 / 16)` and split 80/20 by
  `train_test_split(stratify=labels, random_state=0)`: 1,437 train and 360
  test images, with each class in the same proportion in both splits.

  Returns:
    The data set: uint8 images [n, 8, 8, 1], class names '0'..'9'.
  """
  # Imported here because importing scikit-learn takes over a second and only
  # this source needs it.
  import sklearn.datasets  # pylint: disable=g-import-not-at-top
  import sklearn.model_selection  # pylint: disable=g-import-not-at-top

  digits = sklearn.datasets.load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_images, test_images, train_labels, test_labels = sklearn.model_selection.train_test_split(
      images, labels, test_size=0.2, stratify=labels, random_state=0
  )
  return ImageDataset(
      name="digits",
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=tuple(str(name) for name in digits.target_names),
  )


def load_idx(
    path: str, *, name: str = "fashion_mnist", class_names: tuple[str, ...] | None = None
) -> ImageDataset:
  """Loads MNIST-style IDX files (train-*/t10k-*, optionally .gz) from a folder.

  Args:
    path: the folder with the four IDX files.
    name: data set name for logs.
    class_names: names in label order; default the Fashion-MNIST names when
      there are 10 classes, else the label numbers.

  Returns:
    uint8 images [n, 28, 28, 1] for the MNIST family, int32 labels.
  """
  train_images, train_labels = idx.load_idx_split(str(path), "train")
  test_images, test_labels = idx.load_idx_split(str(path), "test")
  if class_names is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if num_classes == len(idx.FASHION_MNIST_CLASSES):
      class_names = idx.FASHION_MNIST_CLASSES
    else:
      class_names = tuple(str(i) for i in range(num_classes))
  return ImageDataset(
      name=name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=tuple(class_names),
  )


# Image folders.


def resolve_folder_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Return `config.path`, or `$JAXBASE_DATA_DIR/{config.default_file}`.

  Args:
    config: The `data` config.

  Returns:
    The path, with `~` expanded. It is not checked for existence.

  Raises:
    ValueError: If `path` is None and `JAXBASE_DATA_DIR` or `default_file`
      is not set.
  """
  path = config.get("path")
  if path:
    return pathlib.Path(path).expanduser()

  data_dir = os.environ.get(DATA_DIR_ENV)
  default_file = config.get("default_file")
  if not data_dir:
    raise ValueError(
        f"data.path is not set and the environment variable {DATA_DIR_ENV} is "
        "not set; pass --config.data.path=/path/to/images (a folder or "
        f".tar.gz), or set {DATA_DIR_ENV} to the directory that contains "
        f"{default_file or 'the data file'}"
    )
  if not default_file:
    raise ValueError(
        "data.path is not set and data.default_file is empty, so there is no "
        f"file to look up in {DATA_DIR_ENV}={data_dir}; pass "
        "--config.data.path=/path/to/images"
    )
  return pathlib.Path(data_dir).expanduser() / default_file


def load_image_folder(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    cache_dir: str | os.PathLike | None = None,
) -> ImageDataset:
  """Load an image-folder tree or a tar archive of one, caching the decoded arrays.

  The layout is `ROOT/{split}/{class}/{image}`. ROOT is `path` itself or, if
  `path` contains exactly one folder and no split folders, that folder, which
  is how archives such as `cifar10/{train,test}/...` are usually packed.
  Class names are the sorted folder names of the train split, so label `i`
  is the `i`-th class in alphabetical order. The test split must have the
  same class folders. Within a class, images are ordered by file name.

  Files and folders whose names start with '.' are skipped, for example
  `.DS_Store` and the `._*` files that macOS adds to archives. Every other
  file under a class folder must be an image that Pillow can decode. Images
  are converted to RGB: grayscale is replicated to three channels, 16-bit
  grayscale keeps its high byte, and alpha is dropped. All images must share
  one height and width.

  The arrays are cached in `{cache_dir}/{stem}-{hash}.npz`. The hash covers
  the absolute path, the split names and the size and modification time of
  the archive, or of every file in the folder tree, so changing the data
  starts a fresh decode. A tar archive is read as a stream and is never
  extracted to disk.

  Args:
    path: A directory or a tar archive (any compression `tarfile` reads).
    name: Data set name; defaults to the file or folder name without its
      extension.
    train_split: Name of the train split folder.
    test_split: Name of the test split folder.
    cache_dir: Cache directory; None means `$JAXBASE_CACHE_DIR`, else
      `~/.cache/jaxbase`.

  Returns:
    The data set: uint8 images [n, height, width, 3] and int32 labels.

  Raises:
    FileNotFoundError: If `path` or a split folder does not exist.
    ValueError: If the layout is wrong, a folder has no images, an image
      cannot be decoded, or images differ in size. The message names the
      folder or file.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if not path.exists():
    raise FileNotFoundError(
        f"image folder or archive {path} not found; pass an existing "
        "directory or .tar.gz with --config.data.path"
    )
  stem = _path_stem(path)
  name = name or stem
  splits = (train_split, test_split)

  if path.is_dir():
    folder = _DirectoryFolder(path)
  else:
    try:
      is_tar = tarfile.is_tarfile(path)
    except (EOFError, zlib.error, tarfile.TarError) as error:
      # is_tarfile reads the first header, which fails on damaged archives.
      raise ValueError(
          f"failed to read archive {path}: {error}; the file may be truncated"
      ) from error
    if not is_tar:
      raise ValueError(
          f"{path} is neither a directory nor a tar archive; pass an image "
          "folder or a .tar.gz of one"
      )
    folder = _TarFolder(path)

  cache_path = _cache_file(cache_dir, stem, path, splits, folder.fingerprint())
  cached = _read_cache(cache_path)
  if cached is not None:
    logging.info("Loaded %s from cache %s", name, cache_path)
    return ImageDataset(name=name, **cached)

  layout = _find_layout(folder.list_entries(), path, train_split, test_split)
  arrays = _decode_layout(folder, layout, name)
  _write_cache(cache_path, arrays)
  return ImageDataset(name=name, **arrays)


def _path_stem(path: pathlib.Path) -> str:
  """Return the file name without archive extensions ('a.tar.gz' -> 'a')."""
  stem = path.name
  for suffix in (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar"):
    if stem.endswith(suffix) and len(stem) > len(suffix):
      return stem[: -len(suffix)]
  return stem


def _is_hidden(relative_path: pathlib.PurePosixPath) -> bool:
  return any(part.startswith(".") for part in relative_path.parts)


class _DirectoryFolder:
  """An image-folder tree on disk."""

  def __init__(self, root: pathlib.Path):
    self.root = root

  def describe(self, relative_path: pathlib.PurePosixPath) -> str:
    return str(self.root / relative_path)

  def list_entries(
      self,
  ) -> tuple[list[pathlib.PurePosixPath], list[pathlib.PurePosixPath]]:
    """Return the non-hidden (files, folders) under the root, relative to it."""
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
      relative_dir = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(self.root).as_posix())
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      folders.extend(relative_dir / d for d in dirnames)
      files.extend(relative_dir / f for f in filenames if not f.startswith("."))
    return files, folders

  def fingerprint(self) -> list:
    files, _ = self.list_entries()
    entries = []
    for relative_path in sorted(files):
      stat = (self.root / relative_path).stat()
      entries.append((str(relative_path), stat.st_size, stat.st_mtime_ns))
    return entries

  def read_files(self, paths: set[pathlib.PurePosixPath]):
    """Yield (relative path, bytes) for each of `paths`."""
    for relative_path in sorted(paths):
      yield relative_path, (self.root / relative_path).read_bytes()


class _TarFolder:
  """An image-folder tree inside a tar archive, read as a stream."""

  def __init__(self, archive: pathlib.Path):
    self.archive = archive

  def describe(self, relative_path: pathlib.PurePosixPath) -> str:
    return f"member {str(relative_path)!r} of archive {self.archive}"

  def fingerprint(self) -> list:
    stat = self.archive.stat()
    return [stat.st_size, stat.st_mtime_ns]

  @contextlib.contextmanager
  def _open(self) -> Iterator[tarfile.TarFile]:
    """Opens the archive as a stream and, after a full read, checks that it was complete.

    Stream mode reads the archive front to back once, so the compressed file is
    never seeked or extracted. tarfile alone reads an archive cut at a member
    boundary as a smaller complete one. So the decompression is done here: a
    compressed stream that ends early raises EOFError when read to its end. An
    uncompressed archive must end in the zero blocks that tar writes last.
    """
    with open(self.archive, "rb") as raw:
      magic = raw.read(6)
      raw.seek(0)
      opener = next((o for prefix, o in _DECOMPRESSORS if magic.startswith(prefix)), None)
      stream = opener(raw) if opener else raw
      with tarfile.open(fileobj=stream, mode="r|") as tar:
        yield tar
      if opener:
        while stream.read(1 << 20):  # Only the padding after the last member is left.
          pass
      else:
        size = os.fstat(raw.fileno()).st_size
        raw.seek(max(size - 1024, 0))
        if size % 512 or raw.read(1024).strip(b"\0"):
          raise tarfile.ReadError("the archive does not end with tar's end-of-archive blocks")

  def list_entries(
      self,
  ) -> tuple[list[pathlib.PurePosixPath], list[pathlib.PurePosixPath]]:
    """Return the non-hidden (files, folders) in the archive."""
    files, folders = [], []
    try:
      with self._open() as tar:
        for member in tar:
          relative_path = _member_path(member)
          if relative_path is None or _is_hidden(relative_path):
            continue
          (folders if member.isdir() else files).append(relative_path)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
      raise ValueError(
          f"failed to read archive {self.archive}: {error}; the file may be "
          "truncated or not a tar archive"
      ) from error
    return files, folders

  def read_files(self, paths: set[pathlib.PurePosixPath]):
    """Yield (relative path, bytes) for each member in `paths`, in archive order."""
    try:
      with self._open() as tar:
        for member in tar:
          relative_path = _member_path(member)
          if relative_path not in paths:
            continue
          if not member.isfile():
            raise ValueError(
                f"{self.describe(relative_path)} is a link or special file, "
                "not an image; store images as regular files"
            )
          yield relative_path, tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error) as error:
      raise ValueError(
          f"failed to read archive {self.archive}: {error}; the file may be truncated"
      ) from error


# The first bytes of each compressed format tar archives use, with its reader.
_DECOMPRESSORS = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)


def _member_path(member: tarfile.TarInfo) -> pathlib.PurePosixPath | None:
  """Return the member's path without a leading './' or '/', None for the root."""
  parts = [p for p in pathlib.PurePosixPath(member.name).parts if p not in ("/", ".")]
  return pathlib.PurePosixPath(*parts) if parts else None


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Class names, and the image paths and labels of each split."""

  class_names: tuple[str, ...]
  # Split name -> list of (path relative to the folder or archive, label),
  # ordered by class and then file name.
  images: dict[str, list[tuple[pathlib.PurePosixPath, int]]]


def _find_layout(
    entries: tuple[list[pathlib.PurePosixPath], list[pathlib.PurePosixPath]],
    path: pathlib.Path,
    train_split: str,
    test_split: str,
) -> _Layout:
  """Match the listed entries to `ROOT/{split}/{class}/{image}`."""
  files, folders = entries
  expected = f"expected {path}/[TOP/]{{{train_split},{test_split}}}/CLASS/IMAGE"

  # Folders are implied by file paths too, because tar archives need not
  # contain entries for them.
  all_folders = set(folders)
  for file in files:
    all_folders.update(file.parents)
  all_folders.discard(pathlib.PurePosixPath("."))

  root = pathlib.PurePosixPath(".")
  if root / train_split not in all_folders:
    top_level = sorted({folder.parts[0] for folder in all_folders})
    if len(top_level) == 1 and root / top_level[0] / train_split in all_folders:
      root = root / top_level[0]
    else:
      raise FileNotFoundError(
          f"split folder '{train_split}' not found in {path} or in a single "
          f"top-level folder inside it (folders found: "
          f"{', '.join(top_level) or 'none'}); {expected}"
      )

  split_classes = {}
  split_images = {}
  for split in (train_split, test_split):
    split_dir = root / split
    if split_dir not in all_folders:
      raise FileNotFoundError(
          f"split folder '{split}' not found next to '{train_split}' in {path}; {expected}"
      )
    class_dirs = sorted(f.name for f in all_folders if f.parent == split_dir)
    per_class = {name: [] for name in class_dirs}
    for file in files:
      if split_dir not in file.parents:
        continue
      relative = file.relative_to(split_dir)
      if len(relative.parts) != 2:
        raise ValueError(
            f"unexpected file {file} in {path}: images must sit directly in "
            f"a class folder; {expected}"
        )
      per_class[relative.parts[0]].append(file)
    if not class_dirs:
      raise ValueError(
          f"split folder {split_dir} in {path} contains no class folders and "
          f"no images; {expected}"
      )
    for class_name, class_files in per_class.items():
      if not class_files:
        raise ValueError(
            f"class folder {split_dir / class_name} in {path} contains no "
            f"images; add images or remove the folder ({expected})"
        )
    split_classes[split] = class_dirs
    split_images[split] = per_class

  train_classes = set(split_classes[train_split])
  test_classes = set(split_classes[test_split])
  if train_classes != test_classes:
    raise ValueError(
        f"the '{train_split}' and '{test_split}' splits in {path} have "
        f"different class folders: only in '{train_split}': "
        f"{sorted(train_classes - test_classes)}, only in '{test_split}': "
        f"{sorted(test_classes - train_classes)}"
    )

  class_names = tuple(split_classes[train_split])
  images = {}
  for split in (train_split, test_split):
    images[split] = [
        (file, label)
        for label, class_name in enumerate(class_names)
        for file in sorted(split_images[split][class_name])
    ]
  return _Layout(class_names=class_names, images=images)


def _decode_image(data: bytes, description: str) -> np.ndarray:
  """Decode one image file to a uint8 RGB array [height, width, 3]."""
  try:
    with PIL.Image.open(io.BytesIO(data)) as image:
      mode = image.mode
      if mode.startswith("I;16"):
        # Pillow's convert("RGB") clips 16-bit values at 255; keep the high byte instead.
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
      if mode not in ("I", "F"):
        # convert() also forces the full decode, so truncated files fail here.
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
    # Pillow's own message would name an in-memory buffer rather than the file.
    reason = (
        "not in an image format Pillow reads"
        if isinstance(error, PIL.UnidentifiedImageError)
        else str(error)
    )
    raise ValueError(
        f"failed to decode image {description}: {reason}; replace or delete the file"
    ) from error
  raise ValueError(
      f"image {description} has 32-bit {'integer' if mode == 'I' else 'float'} pixels of "
      "unknown range; convert it to an 8-bit image"
  )


def _decode_layout(folder, layout: _Layout, name: str) -> dict:
  """Decode every image in the layout into the `ImageDataset` arrays."""
  splits = list(layout.images)
  position = {}
  for split in splits:
    for index, (file, _) in enumerate(layout.images[split]):
      position[file] = (split, index)
  decoded = {split: [None] * len(layout.images[split]) for split in splits}

  first_shape = None
  first_description = None
  with tqdm.tqdm(total=len(position), desc=f"Decoding {name}", unit="image") as progress:
    for file, data in folder.read_files(set(position)):
      description = folder.describe(file)
      image = _decode_image(data, description)
      if first_shape is None:
        first_shape, first_description = image.shape, description
      elif image.shape != first_shape:
        raise ValueError(
            f"image {description} is {image.shape[0]}x{image.shape[1]} "
            f"(height x width) but {first_description} is "
            f"{first_shape[0]}x{first_shape[1]}; all images must share one "
            "size, so resize them first"
        )
      split, index = position[file]
      decoded[split][index] = image
      progress.update(1)

  train_split, test_split = splits
  return {
      "train_images": np.stack(decoded[train_split]),
      "train_labels": np.array([l for _, l in layout.images[train_split]], np.int32),
      "test_images": np.stack(decoded[test_split]),
      "test_labels": np.array([l for _, l in layout.images[test_split]], np.int32),
      "class_names": layout.class_names,
  }


# Cache of decoded image folders.


def _cache_file(
    cache_dir: str | os.PathLike | None,
    stem: str,
    path: pathlib.Path,
    splits: tuple[str, str],
    fingerprint: list,
) -> pathlib.Path:
  if cache_dir is None:
    cache_dir = os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
  key = json.dumps([_CACHE_VERSION, str(path), list(splits), fingerprint])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return pathlib.Path(cache_dir).expanduser() / f"{stem}-{digest}.npz"


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


def _read_cache(cache_path: pathlib.Path) -> dict | None:
  """Return the cached arrays, or None if there is no readable cache file."""
  if not cache_path.exists():
    return None
  try:
    with np.load(cache_path, allow_pickle=False) as cache:
      arrays = {key: cache[key] for key in _CACHE_KEYS}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
    logging.warning(
        "Ignoring unreadable cache file %s (%s); decoding the images again",
        cache_path,
        error,
    )
    return None
  arrays["class_names"] = tuple(str(c) for c in arrays["class_names"])
  return arrays


def _write_cache(cache_path: pathlib.Path, arrays: dict) -> None:
  """Write the arrays atomically; a failure is logged, since the cache is optional."""
  to_save = dict(arrays)
  to_save["class_names"] = np.array(arrays["class_names"], dtype=str)
  temp_path = None
  try:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary file in the same directory, renamed into place, means a
    # crash never leaves a truncated cache file under the final name.
    handle, temp_path = tempfile.mkstemp(
        dir=cache_path.parent, prefix=f".{cache_path.stem}-", suffix=".tmp"
    )
    with os.fdopen(handle, "wb") as temp_file:
      np.savez(temp_file, **to_save)
    # mkstemp creates the file 0600; give the cache the usual permissions so
    # other users of a shared cache directory can read it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_path, 0o666 & ~umask)
    os.replace(temp_path, cache_path)
  except OSError as error:
    logging.warning("Could not write cache file %s: %s", cache_path, error)
    if temp_path is not None and os.path.exists(temp_path):
      os.remove(temp_path)
    return
  logging.info("Cached decoded images in %s", cache_path)


# TensorFlow Datasets.


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> ImageDataset:
  """Read a prepared TensorFlow Datasets image data set into memory.

  The data set must already be prepared in `data_dir` in array_record format,
  because this never downloads or prepares anything: it calls
  `tfds.data_source(..., download=False)`, which reads the files without
  TensorFlow. Records must have an 'image' feature (uint8, one shape) and a
  'label' feature.

  Args:
    name: tfds name, e.g. 'cifar10' or 'mnist', optionally with a config
      and version ('name/config:1.0.0').
    data_dir: tfds data directory, with `~` expanded; None uses
      `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`.
    train_split: Train split, any tfds split string such as 'train[:90%]'.
    test_split: Test split.

  Returns:
    The data set. Class names come from the 'label' feature when it is a
    `ClassLabel`, else they are '0', '1', ... up to the largest label.

  Raises:
    ValueError: If `name` is missing or unknown, the data set was prepared
      in a format without random access, or the records are not uniform
      uint8 images.
    FileNotFoundError: If the data set is not prepared in `data_dir`.
  """
  if not name:
    raise ValueError(
        "data.name is empty; set it to a tfds data set name, e.g. --config.data.name=cifar10"
    )
  # Imported here because only this source needs tfds.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if data_dir is not None:
    # Shells leave '~' unexpanded in '--config.data.data_dir=~/...'.
    data_dir = os.path.expanduser(data_dir)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ValueError(
        f"unknown tfds data set {name!r}; check data.name against the tfds catalog"
    ) from error
  if not builder.is_prepared():
    default_data_dir = os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    raise FileNotFoundError(
        f"tfds data set {name!r} is not prepared in {builder.data_dir}; "
        "load_tfds never downloads data. Prepare it once with TensorFlow "
        "installed (pip install -e '.[tf]' in the jaxbase checkout): "
        f"tfds build {name} --data_dir={data_dir or default_data_dir} "
        "--file_format=array_record"
    )

  arrays = {}
  for key, split in (("train", train_split), ("test", test_split)):
    try:
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as error:
      raise ValueError(
          f"tfds data set {name!r} in {builder.data_dir} is stored in a "
          "format without random access (usually tfrecord); rebuild it with "
          f"tfds build {name} --file_format=array_record"
      ) from error
    images, labels = _read_tfds_split(source, f"{name} {split}")
    arrays[f"{key}_images"] = images
    arrays[f"{key}_labels"] = labels

  features = builder.info.features
  class_names = None
  if features is not None and "label" in features.keys():
    class_names = getattr(features["label"], "names", None)
  if not class_names:
    num_classes = (
        int(max(arrays["train_labels"].max(initial=-1), arrays["test_labels"].max(initial=-1))) + 1
    )
    class_names = [str(i) for i in range(num_classes)]
  return ImageDataset(name=name, class_names=tuple(class_names), **arrays)


def _read_tfds_split(source, description: str) -> tuple[np.ndarray, np.ndarray]:
  """Read every record of a tfds data source into (images, labels) arrays."""
  num_records = len(source)
  images = None
  labels = np.empty((num_records,), np.int32)
  with tqdm.tqdm(total=num_records, desc=f"Reading {description}", unit="image") as progress:
    for start in range(0, num_records, _TFDS_READ_CHUNK):
      indices = list(range(start, min(start + _TFDS_READ_CHUNK, num_records)))
      for index, record in zip(indices, source.__getitems__(indices)):
        if "image" not in record or "label" not in record:
          raise ValueError(
              f"{description} record {index} has features {sorted(record)}, "
              "but jaxbase needs 'image' and 'label'"
          )
        image = np.asarray(record["image"])
        if images is None:
          if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(
                f"{description} record {index} has a {image.dtype} image of "
                f"shape {image.shape}; jaxbase needs uint8 [height, width, "
                "channels]"
            )
          images = np.empty((num_records,) + image.shape, np.uint8)
        elif image.shape != images.shape[1:]:
          raise ValueError(
              f"{description} record {index} has an image of shape "
              f"{image.shape}, but record 0 has {images.shape[1:]}; images "
              "of different sizes are not supported"
          )
        images[index] = image
        labels[index] = record["label"]
      progress.update(len(indices))
  if images is None:
    raise ValueError(f"{description} has no records; check the split name")
  return images, labels
