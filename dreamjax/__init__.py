"""dreamjax: DreamLLM in JAX/Flax."""

import os as _os

__version__ = "0.1.0"

# Simulated devices on one CPU (`--xla_force_host_platform_device_count`, how the tests and users rehearse a
# pod): XLA:CPU's concurrency-optimised scheduler lets the devices of one process reach independent
# collectives in different orders, and on a few cores their in-process rendezvous then starves and XLA aborts
# the process after 40 s (seen on 2 cores with the FSDP-sharded tiny model on 8 devices). The default
# scheduler keeps one order. Set here, before any backend starts; a value the user set wins.
_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
if "xla_force_host_platform_device_count" in _os.environ.get("XLA_FLAGS", "") and \
        _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] += f" {_FLAG}=false"
