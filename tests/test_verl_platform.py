"""The CPU platform and the one patch of verl (spd_verl.verl_ext.cpu_platform)."""

import inspect
import os
import subprocess
import sys

import pytest
import torch


def test_patch_still_needed_and_still_applies():
    """Fails when verl changes underneath the gloo fix: then revisit cpu_platform.py."""
    import verl.utils.distributed as dist_utils
    import verl.workers.engine_workers as engine_workers

    from spd_verl.verl_ext import cpu_platform

    original = getattr(dist_utils.initialize_global_process_group_ray, "_spd_original",
                       dist_utils.initialize_global_process_group_ray)
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(original)
    assert "from verl.utils.distributed import initialize_global_process_group_ray" in \
        inspect.getsource(engine_workers)
    assert set(cpu_platform.PATCHED_IMPORTERS) >= {"verl.utils.distributed", "verl.workers.engine_workers"}
    # torch still rejects the string verl builds for device cpu (else the patch can go)
    from torch.distributed.distributed_c10d import BackendConfig

    with pytest.raises(ValueError, match="Duplicate device type"):
        BackendConfig(torch.distributed.Backend("cpu:gloo,cpu:gloo"))


def test_cpu_platform_device_calls():
    from verl.plugin.platform import get_platform
    from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_resource_name, get_torch_device

    from spd_verl.verl_ext.cpu_platform import PlatformCPU

    assert isinstance(get_platform(), PlatformCPU)
    assert (get_device_name(), get_device_id(), get_nccl_backend(), get_resource_name()) == ("cpu", "cpu", "gloo", "GPU")
    dev = get_torch_device()
    dev.empty_cache(), dev.synchronize(), dev.set_device(0), dev.ipc_collect()
    assert dev.max_memory_allocated() == 0 and dev.memory_reserved() == 0
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    state = dev.get_rng_state()
    a = torch.rand(3)
    dev.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    assert not PlatformCPU().is_platform_available(use_smi_check=True)  # never auto-detected


def test_verl_process_group_initialises_with_gloo(dist_group):
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"


def test_nothing_patched_without_cpu_platform():
    """On accelerators (no VERL_PLATFORM=cpu) the platform exists but verl is left untouched."""
    code = ("import verl, verl.workers.engine_workers as w, verl.utils.distributed as d;"
            "from spd_verl.verl_ext.cpu_platform import cpu_platform_selected;"
            "print('RESULT', getattr(w.initialize_global_process_group_ray, '_spd_gloo_fix', False),"
            " getattr(d.initialize_global_process_group_ray, '_spd_gloo_fix', False), cpu_platform_selected())")
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "RESULT False False False" in proc.stdout, proc.stderr[-2000:]
