"""A CPU device platform for verl (selected with ``VERL_PLATFORM=cpu``; never used on accelerators).

verl 0.9.1 ships platforms for nvidia/huawei/amd only and falls back to "nvidia" without an
accelerator. This platform makes verl's device calls valid on a CPU-only machine: device "cpu",
gloo collectives, no-op memory/profiler calls. Ray still sees the worker's resource as "GPU"
because verl's resource pools always request one (start Ray with ``num_gpus=1``).

This module also holds the one unavoidable patch of verl in this package, see
:func:`install_gloo_backend_fix`.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"


def _noop(*args, **kwargs):
    return None


def _zero(*args, **kwargs):
    return 0


def _mem_get_info(*args, **kwargs):
    import psutil

    vm = psutil.virtual_memory()
    return vm.available, vm.total


# verl calls these through ``get_torch_device()`` (== the platform's device module). torch.cpu
# lacks the memory/rng functions, so this namespace completes it: memory queries report 0 or host
# memory, cache/IPC calls do nothing, and the RNG state is the CPU generator's.
_CPU_DEVICE_MODULE = SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 1,
    current_device=lambda: "cpu",
    set_device=_noop,
    synchronize=_noop,
    empty_cache=_noop,
    ipc_collect=_noop,
    set_per_process_memory_fraction=_noop,
    memory_allocated=_zero,
    memory_reserved=_zero,
    max_memory_allocated=_zero,
    max_memory_reserved=_zero,
    reset_peak_memory_stats=_noop,
    mem_get_info=_mem_get_info,
    get_device_name=lambda *a, **k: "cpu",
    get_rng_state=lambda *a, **k: torch.get_rng_state(),
    set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
    current_stream=torch.cpu.current_stream,
    stream=torch.cpu.stream,
    Stream=torch.cpu.Stream,
    Event=torch.cpu.Event,
)


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for CPU-only machines (tests and the embedded demo)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self):
        return _CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: a GPU machine must not pick it up. Only VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self):
        # A string, not an int: FSDP2 treats an int device id as an accelerator index.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index=None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets it for actors holding the (fake) "GPU" resource; harmless on CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def cpu_platform_selected() -> bool:
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


# ----------------------------------------------------------------------------- the one patch
# WHY: verl builds its process-group backend string as f"cpu:gloo,{device}:{backend}"
# (verl.utils.distributed.initialize_global_process_group_ray, called with backend=None by the
# training workers). For device "cpu" that is "cpu:gloo,cpu:gloo", which torch rejects
# ("Duplicate device type cpu"); no platform method can change the device part. The fix passes
# plain "gloo" when the platform is cpu and the caller left the backend to verl. It is installed
# only under VERL_PLATFORM=cpu, and tests/test_verl_platform.py fails if verl stops building the
# string this way or stops importing the function by name into verl.workers.engine_workers.
PATCHED_FUNCTION = "initialize_global_process_group_ray"
PATCHED_IMPORTERS = ("verl.utils.distributed", "verl.workers.engine_workers")


def install_gloo_backend_fix() -> bool:
    """Route verl's default process-group backend to "gloo" on the CPU platform. Idempotent."""
    if not cpu_platform_selected():
        return False
    import sys

    import verl.utils.distributed as dist_utils

    original = getattr(dist_utils, PATCHED_FUNCTION)
    if getattr(original, "_spd_gloo_fix", False):
        return True

    @functools.wraps(original)
    def initialize_with_gloo(timeout_second=None, backend=None):
        from verl.utils.device import get_device_name

        if backend is None and get_device_name() == "cpu":
            backend = "gloo"
        return original(timeout_second=timeout_second, backend=backend)

    initialize_with_gloo._spd_gloo_fix = True
    initialize_with_gloo._spd_original = original
    # Modules that already did ``from verl.utils.distributed import ...`` hold their own reference.
    for name in PATCHED_IMPORTERS:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, PATCHED_FUNCTION):
            setattr(module, PATCHED_FUNCTION, initialize_with_gloo)
    return True
