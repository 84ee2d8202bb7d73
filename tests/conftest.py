"""Test-suite set-up: 8 virtual CPU devices, so sharding code runs for real.

The XLA flag must be set before JAX is imported anywhere, which is why it lives at the
top of the suite's conftest.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
