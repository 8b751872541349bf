"""Shared behaviour of the command-line scripts: input errors end in one line, not a traceback."""

import functools
import sys
from collections.abc import Callable

from absl import flags
from absl import logging

TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of input errors instead of only their message."
)

# Errors that describe bad input and name the fix, so a traceback adds nothing for the user.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError)


def report_input_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps a script's `main` so that an input error logs its message and exits with status 1.

  `--traceback` lets the error propagate with its traceback instead. Other
  exceptions, which point at a bug rather than at the input, always show theirs.
  """

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    try:
      main(argv)
    except INPUT_ERRORS as error:
      if TRACEBACK.value:
        raise
      logging.error("%s: %s", type(error).__name__, error)
      sys.exit(1)

  return wrapped
