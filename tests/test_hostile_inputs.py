"""Hostile inputs, one table row each: the documented handling, or an error that names the place.

Rows cover image folders, TSV text files, the decoded-image cache and config
values. A row expects either an exception whose message matches a pattern
(naming the file, line or key, and the fix), or a check of what was loaded.
"""

import importlib
import io
import json
import logging
import pathlib

import numpy as np
import PIL.Image
import pytest

from jaxbase.configs import digits_resnet
from jaxbase.data import sources
from jaxbase.data.text_files import read_tsv
from jaxbase.train import config_check
from jaxbase.train import writer

# Image folders: a valid tree with classes 'cat' and 'dog', two train images and
# one test image each, 4x4 RGB; each case damages it in one way.


def _png(value, size=(4, 4), mode="RGB") -> bytes:
  channels = {"RGB": 3, "RGBA": 4, "L": 1}
  if mode == "I;16":
    array = np.full(size, value, np.uint16)
  else:
    array = np.full((*size, channels[mode]), value, np.uint8).squeeze()
    if mode == "RGBA":
      array = np.full((*size, 4), value, np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _tree(root: pathlib.Path) -> pathlib.Path:
  for split, count in (("train", 2), ("test", 1)):
    for label, name in enumerate(("cat", "dog")):
      folder = root / split / name
      folder.mkdir(parents=True)
      for index in range(count):
        (folder / f"{index:04d}.png").write_bytes(_png(100 * label + index))
  return root


def _load(root, tmp_path):
  return sources.load_image_folder(root, cache_dir=tmp_path / "cache")


def _truncated_png(root):
  data = (root / "train/cat/0001.png").read_bytes()
  (root / "train/cat/0001.png").write_bytes(data[: len(data) // 2])


def _garbage_jpeg(root):
  (root / "train/dog/0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _text_file(root):
  (root / "train/cat/notes.txt").write_text("labelled by Alice\n")


def _hidden_files(root):
  (root / "train/cat/.DS_Store").write_bytes(b"\x00\x01binary")
  (root / "train/dog/._0000.png").write_bytes(b"AppleDouble")
  (root / "train/.cache").mkdir()
  (root / "train/.cache/0000.png").write_bytes(_png(7))


def _mixed_modes(root):
  (root / "train/cat/0000.png").write_bytes(_png(50, mode="L"))
  (root / "train/cat/0001.png").write_bytes(_png(60, mode="RGBA"))
  (root / "train/dog/0000.png").write_bytes(_png(40000, mode="I;16"))


def _other_size(root):
  (root / "train/dog/0001.png").write_bytes(_png(1, size=(5, 4)))


def _empty_class(root):
  (root / "train/bird").mkdir()
  (root / "test/bird").mkdir()


def _empty_test_split(root):
  for folder in (root / "test").iterdir():
    for file in folder.iterdir():
      file.unlink()
    folder.rmdir()


def _check_hidden_skipped(dataset):
  assert len(dataset.train_labels) == 4
  assert dataset.class_names == ("cat", "dog")


def _check_modes_converted(dataset):
  assert dataset.train_images.shape == (4, 4, 4, 3)
  np.testing.assert_array_equal(dataset.train_images[0], 50)  # Grayscale to three channels.
  np.testing.assert_array_equal(dataset.train_images[1], 60)  # Alpha dropped.
  np.testing.assert_array_equal(dataset.train_images[2], 40000 >> 8)  # 16-bit: high byte.


FOLDER_CASES = [
    ("truncated image", _truncated_png, ValueError, r"failed to decode image .*cat/0001\.png"),
    ("corrupt image", _garbage_jpeg, ValueError, r"failed to decode image .*dog/0001\.jpg"),
    (
        "non-image file",
        _text_file,
        ValueError,
        r"cat/notes\.txt: not in an image format Pillow reads; replace or delete the file",
    ),
    ("hidden files", _hidden_files, None, _check_hidden_skipped),
    ("grayscale, RGBA and 16-bit", _mixed_modes, None, _check_modes_converted),
    ("image of another size", _other_size, ValueError, r"dog/0001\.png is 5x4 .*resize them"),
    ("empty class folder", _empty_class, ValueError, r"class folder train/bird .*no images"),
    ("empty split", _empty_test_split, ValueError, r"split folder test .*no class folders"),
]


@pytest.mark.parametrize(
    "damage, error, expected", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES]
)
def test_image_folder_input(tmp_path, damage, error, expected):
  root = _tree(tmp_path / "images")
  damage(root)
  if error is not None:
    with pytest.raises(error, match=expected):
      _load(root, tmp_path)
  else:
    expected(_load(root, tmp_path))


def test_pickled_cache_file_never_unpickled(tmp_path, caplog):
  root = _tree(tmp_path / "images")
  _load(root, tmp_path)
  (cache_file,) = (tmp_path / "cache").iterdir()
  # An object array is stored with pickle; loading it would run code chosen by the file.
  with open(cache_file, "wb") as f:
    np.savez(f, train_images=np.array([object()], dtype=object))
  with caplog.at_level(logging.WARNING):
    dataset = _load(root, tmp_path)
  assert any("Ignoring unreadable cache file" in r.getMessage() for r in caplog.records)
  assert len(dataset.train_labels) == 4


# TSV text files.


def _write(tmp_path, text, name="split.tsv") -> str:
  path = tmp_path / name
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return str(path)


TSV_CASES = [
    ("missing text", "label\ttext\n0\tgood\n1\n", ValueError, r"line 3: expected 2 tab-separated"),
    ("extra tab", "label\ttext\n0\tgood\tbad\n", ValueError, r"line 2: expected 2 .* got 3"),
    ("empty text", "label\ttext\n0\t  \n", ValueError, r"line 2: the text is empty"),
    ("non-integer label", "label\ttext\npos\tgood\n", ValueError, r"line 2: the label 'pos'"),
    (
        "label outside classes",
        "label\ttext\n0\ta\n2\tb\n",
        ValueError,
        r"line 3: the label 2 is outside \[0, 2\)",
    ),
    ("negative label", "label\ttext\n-1\ta\n", ValueError, r"line 2: the label -1 is outside"),
    ("no header", "0\tgood\n1\tbad\n", ValueError, r"line 1: expected the header"),
    ("empty file", "", ValueError, r"is empty"),
    ("header only", "label\tsentence\n\n", ValueError, r"has a header but no examples"),
    ("invalid UTF-8", b"label\ttext\n0\tcaf\xe9\n", ValueError, r"line 2: not valid UTF-8"),
]


@pytest.mark.parametrize(
    "content, error, pattern", [c[1:] for c in TSV_CASES], ids=[c[0] for c in TSV_CASES]
)
def test_tsv_rejected_with_line(tmp_path, content, error, pattern):
  path = _write(tmp_path, content)
  with pytest.raises(error, match=pattern) as info:
    read_tsv(path, num_classes=2)
  assert path in str(info.value)


def test_tsv_quotes_blank_lines_crlf_and_bom_kept(tmp_path):
  content = (
      "\ufefflabel\tsentence\r\n"
      '1\tthe " director \'s cut " is "better\r\n'
      "\n"
      "   \n"
      ' 0 \t"quoted whole"\r\n'
  )
  labels, texts = read_tsv(_write(tmp_path, content), num_classes=2)
  np.testing.assert_array_equal(labels, [1, 0])
  assert labels.dtype == np.int32
  assert texts == ['the " director \'s cut " is "better', '"quoted whole"']


def test_tsv_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.tsv not found"):
    read_tsv(tmp_path / "nothere.tsv")


# Config values.


def _set(key, value):
  config = digits_resnet.get_config()
  *parents, leaf = key.split(".")
  target = config
  for parent in parents:
    target = target[parent]
  # Bypass ml_collections' type lock, as a hand-written config file would.
  with target.ignore_type():
    target[leaf] = value
  return config


CONFIG_CASES = [
    ("batch_size", "64", r"config\.batch_size must be an integer >= 1, got '64' \(str\)"),
    ("num_epochs", 1.5, r"config\.num_epochs must be an integer >= 1, got 1\.5 \(float\)"),
    ("seed", True, r"config\.seed must be an integer >= 0, got True \(bool\)"),
    ("checkpoint.keep", 0, r"config\.checkpoint\.keep must be an integer >= 1, got 0"),
    ("loss.label_smoothing", 1.5, r"label_smoothing must be a number in \[0, 1\), got 1\.5"),
    ("optim.lr", float("nan"), r"config\.optim\.lr must be a number > 0, got nan"),
    ("augment.flip", "yes", r"config\.augment\.flip must be true or false, got 'yes'"),
    ("eval_flip", 1, r"config\.eval_flip must be true or false, got 1 \(int\)"),
    ("on_nonfinite", "ignore", r"config\.on_nonfinite must be one of raise, skip"),
]


@pytest.mark.parametrize("key, value, pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_value_rejected_with_key(key, value, pattern):
  with pytest.raises(ValueError, match=pattern):
    config_check.check_config(_set(key, value))


def test_config_lists_every_invalid_key():
  config = _set("batch_size", -1)
  config.num_epochs = 0
  with pytest.raises(ValueError) as info:
    config_check.check_config(config)
  assert "config.batch_size" in str(info.value)
  assert "config.num_epochs" in str(info.value)


def test_shipped_configs_pass_checks():
  configs_dir = pathlib.Path(sources.__file__).parents[1] / "configs"
  names = sorted(p.stem for p in configs_dir.glob("*.py") if p.stem != "__init__")
  assert "digits_resnet" in names
  for name in names:
    module = importlib.import_module(f"jaxbase.configs.{name}")
    config_check.check_config(module.get_config())


# Safety: no pickle anywhere a checkpoint or data file is read.


def test_sources_never_load_pickle():
  package = pathlib.Path(sources.__file__).parents[1]
  offenders = []
  for path in package.rglob("*.py"):
    text = path.read_text()
    for pattern in ("import pickle", "allow_pickle=True", "cloudpickle", "dill"):
      if pattern in text:
        offenders.append(f"{path.relative_to(package)}: {pattern}")
    for line in text.splitlines():
      if "np.load(" in line and "allow_pickle=False" not in line:
        offenders.append(f"{path.relative_to(package)}: {line.strip()}")
  assert not offenders
  # The check can fail: it finds the one np.load call that exists.
  assert "np.load(" in (package / "data" / "sources.py").read_text()


def test_partial_metrics_line_skipped(tmp_path, caplog):
  # A process killed while appending to metrics.jsonl can leave half a line.
  (tmp_path / writer.METRICS_FILE).write_text(
      '{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "tra'
  )
  with caplog.at_level(logging.WARNING):
    records = writer.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2]
  assert any("Skipped 1 unreadable line(s)" in r.getMessage() for r in caplog.records)


def test_resumed_writer_drops_records_after_its_step(tmp_path):
  # An attempt killed after logging step 3 but with only step 2 saved: the
  # resumed run writes steps 3 and later again, once each.
  (tmp_path / writer.METRICS_FILE).write_text(
      "".join(f'{{"step": {step}, "train/loss": {step}.0}}\n' for step in (1, 2, 3)) + '{"ste'
  )
  resumed = writer.MetricWriter(str(tmp_path), start_step=2, enabled=True)
  resumed.write(3, {"train/loss": 0.5})
  resumed.close()
  lines = (tmp_path / writer.METRICS_FILE).read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
      {"step": 1, "train/loss": 1.0},
      {"step": 2, "train/loss": 2.0},
      {"step": 3, "train/loss": 0.5},
  ]
  fresh = writer.MetricWriter(str(tmp_path), start_step=0, enabled=True)
  fresh.close()
  assert (tmp_path / writer.METRICS_FILE).read_text() == ""
