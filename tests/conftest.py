"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

from jaxbase import hostdevices

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Adds the longer CPU collective timeout; the device count above takes precedence.
hostdevices.use_cpu_cores_as_devices()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
