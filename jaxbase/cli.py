"""Shared behaviour of the command-line scripts: input errors end in one line, not a traceback."""

import ast
import functools
import os
import sys
from collections.abc import Callable

from absl import flags
from absl import logging

TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "Show the Python traceback of input errors instead of only their message."
)

# Errors that describe bad input and name the fix, so a traceback adds nothing for the user.
# KeyError covers unknown config keys given to --override; OSError missing files and
# folders, and --config files that fail to load (read when main first uses the config).
INPUT_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)


def _unquote(text: str) -> tuple[str, str]:
  """Splits ml_collections' quoted KeyError text into the key and its "Did you mean" hint."""
  for _ in range(2):  # The key arrives quoted once or twice.
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
    if not isinstance(value, str):
      break
    text = value
  key, _, hint = text.partition("\n")
  return key.strip().strip("'\""), " ".join(hint.split())


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the command line like absl, but reports bad --config files and overrides in one line.

  A --config.KEY=VALUE override of a key the config lacks, or a --config file
  that does not exist or fails to load, makes ml_collections raise while the
  flags are parsed, before `main` runs; absl would show the traceback. Pass
  --traceback to see it anyway. Pass this function to
  `app.run(main, flags_parser=parse_flags)`.
  """
  try:
    remaining = flags.FLAGS(argv)
  except Exception as error:  # ml_collections raises plain errors from config files.
    if "--traceback" in argv:
      raise
    if isinstance(error, flags.Error):
      # absl's own message, e.g. a value of the wrong type. Parsing again, as
      # absl's parse_flags_with_usage does, would report the --config.KEY flags
      # as defined twice instead.
      message = " ".join(str(error).split())
    elif isinstance(error, (KeyError, AttributeError)) and error.args:
      # ml_collections: an override of a key the config lacks, e.g. a typo.
      key, hint = _unquote(str(error.args[0]))
      message = f"the config has no key '{key}' (check the --config.KEY=VALUE overrides)"
      if hint:
        message += f". {hint}"
    else:
      message = f"{type(error).__name__}: {' '.join(str(error).split())}"
    _exit_with(message)
  # ml_collections reads a --config file only when main first uses it, and then
  # reports a missing one in several lines; check it here instead.
  if "config" in flags.FLAGS and "--traceback" not in argv:
    # A config file may be followed by ':' and an argument for its get_config.
    path = (getattr(flags.FLAGS["config"], "config_filename", None) or "").split(":", 1)[0]
    if path and not os.path.isfile(path):
      _exit_with(f"the config file {path} does not exist")
  return remaining


def _exit_with(message: str) -> None:
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.stderr.write("Pass --helpshort to see the flags, or --traceback to see where it failed.\n")
  sys.exit(1)


def report_input_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """Wraps a script's `main` so that an input error logs its message and exits with status 1.

  `--traceback` lets the error propagate with its traceback instead. Other
  exceptions, which point at a bug rather than at the input, always show theirs.
  A KeyboardInterrupt (a sweep or study stopped by Ctrl-C or SIGTERM after
  saving its run) logs its message and exits with status 130, as Ctrl-C does.
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
    except KeyboardInterrupt as error:
      if TRACEBACK.value:
        raise
      logging.warning("Stopped: %s", error or "interrupted")
      sys.exit(130)

  return wrapped
