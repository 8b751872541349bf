"""A strict reader of labelled text files in TSV format: `label<TAB>text`, one example a line.

The first line is a header with a column named `label`, in either position (the other column's
name is free: GLUE's SST-2 files use `sentence` or `content`). Quote
characters have no special meaning, as in `csv.QUOTE_NONE`, so a text like
`the " director 's cut "` is read as written. Blank lines are skipped.
Everything else that does not fit the format is rejected with the file and
line number.
"""

import os

import numpy as np


def _fail(path: str, line_number: int, problem: str, fix: str) -> ValueError:
  return ValueError(f"{path}, line {line_number}: {problem}; {fix}")


def read_tsv(
    path: str | os.PathLike, num_classes: int | None = None
) -> tuple[np.ndarray, list[str]]:
  """Reads a `label<TAB>text` file with a header line.

  Handled as a user would expect: blank or whitespace-only lines are skipped,
  Windows line endings (CRLF) and a UTF-8 byte-order mark are accepted, quote
  characters are kept as text, and whitespace around the label is ignored.

  Args:
    path: the TSV file, UTF-8 encoded.
    num_classes: when given, every label must be in [0, num_classes).

  Returns:
    `(labels, texts)`: int32 labels [n] and the n texts, in file order.

  Raises:
    FileNotFoundError: when the file does not exist.
    ValueError: naming the file and line. It is raised for an empty file, a
      file with only a header (an empty split), or a missing header. It is
      also raised for a line that is not valid UTF-8, has no tab or more than
      one, has an empty text, or has a label that is not an integer or lies
      outside [0, num_classes).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"TSV file {path} not found; check data.path and the split name")
  if num_classes is not None and num_classes < 1:
    raise ValueError(f"num_classes must be at least 1, got {num_classes}")
  with open(path, "rb") as f:
    raw_lines = f.read().split(b"\n")

  labels: list[int] = []
  texts: list[str] = []
  header_seen = False
  label_column = 0
  for line_number, raw in enumerate(raw_lines, start=1):
    try:
      line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
      raise _fail(
          path,
          line_number,
          f"not valid UTF-8 ({error.reason} at byte {error.start})",
          "save the file as UTF-8",
      ) from None
    line = line.rstrip("\r")
    if not line.strip():
      continue
    fields = line.split("\t")

    if not header_seen:
      header_seen = True
      names = [field.strip().lower() for field in fields]
      if len(fields) != 2 or "label" not in names:
        raise _fail(
            path,
            line_number,
            f"expected the header 'label<TAB>text', got {line[:80]!r}",
            "add a header line such as 'label\\tsentence' before the first example",
        )
      label_column = names.index("label")
      continue

    if len(fields) != 2:
      raise _fail(
          path,
          line_number,
          f"expected 2 tab-separated fields (label, text), got {len(fields)}",
          "put exactly one tab between the label and the text, and no tab inside the text",
      )
    label_text, text = fields[label_column].strip(), fields[1 - label_column]
    if not text.strip():
      raise _fail(path, line_number, "the text is empty", "remove the line or add its text")
    try:
      label = int(label_text)
    except ValueError:
      raise _fail(
          path,
          line_number,
          f"the label {label_text!r} is not an integer",
          "write labels as class indices 0, 1, ...",
      ) from None
    if label < 0 or (num_classes is not None and label >= num_classes):
      upper = "" if num_classes is None else f", {num_classes}"
      raise _fail(
          path,
          line_number,
          f"the label {label} is outside [0{upper})",
          "fix the label, or list every class in data.class_names",
      )
    labels.append(label)
    texts.append(text)

  if not header_seen:
    raise ValueError(f"{path} is empty; it needs a 'label<TAB>text' header and examples")
  if not texts:
    raise ValueError(
        f"{path} has a header but no examples, so its split is empty; check the file or the "
        "split name"
    )
  return np.asarray(labels, np.int32), texts
