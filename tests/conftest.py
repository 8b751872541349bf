"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Shares compiled programs between tests through a persistent cache of this session.

  Many tests compile the same small train and eval steps. A cache hit loads the
  program instead of compiling it again. The folder is new in every session, so
  no program outlives the jax version and code it was compiled from.
  """
  from jaxbase import environment  # noqa: PLC0415

  environment.enable_compilation_cache(str(tmp_path_factory.mktemp("xla_cache")))
