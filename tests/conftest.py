"""Test-wide setup: 8 host CPU devices so every sharded code path runs in every test."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests compile the same tiny models many times (train, then resume, then generate): a persistent
# compilation cache shared by the xdist workers makes the repeats cheap.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("DREAMJAX_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
