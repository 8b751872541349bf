"""Console logging for jaxbase's scripts."""

import logging
import os

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(logging.Filter):
  """Passes warnings and errors from everyone, and INFO records only from jaxbase and scripts.

  orbax-checkpoint and JAX log dozens of INFO lines per checkpoint save through
  absl; with them the per-epoch summaries are hard to find.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or os.sep + "scripts" + os.sep in path


def show_own_info_only() -> None:
  """Sets absl to INFO and hides other libraries' INFO records on the console."""
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
