"""verl's own FSDP language-model engine, run in this process on the CPU for the tests.

`cpu_engine(model)` gives an `FSDPEngineWithLMHead` whose module is a copy of the model sharded
with FSDP2 (``fully_shard``, per decoder layer and whole, on a one-rank CPU mesh), so its
``infer_batch`` packs the rows, runs the forward and lays out ``log_probs`` exactly as a verl
actor worker does (``use_remove_padding=False``: the padded path, no flash-attn). verl knows no
CPU platform, so `CPUPlatform` stands in for one, and a one-process gloo group serves FSDP and the
data-parallel all-reduce.
"""

from __future__ import annotations

import contextlib
import copy
import socket
from types import SimpleNamespace

import torch
import torch.distributed as dist
from verl.plugin.platform import PlatformBase, get_platform, set_platform


class CPUPlatform(PlatformBase):
    """The accelerator calls verl's engine makes, answered for the CPU."""

    device_name = "cpu"
    vendor_name = "cpu"
    device_module = torch.cpu

    def is_available(self):
        return True

    def current_device(self):
        return "cpu"

    def device_count(self):
        return 1

    def set_device(self, device_index):
        pass

    def synchronize(self, device_index=None):
        pass

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings):
        pass

    def empty_cache(self):
        pass

    def get_device_capability(self, device_index=0):
        return (None, None)

    def communication_backend_name(self):
        return "gloo"

    def visible_devices_envvar(self):
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg):
        yield

    def profiler_start(self):
        pass

    def profiler_stop(self):
        pass

    def ray_resource_name(self):
        return "CPU"

    def ray_noset_envvars(self):
        return []

    def is_ipc_supported(self):
        return False

    def cudart(self):
        return None


@contextlib.contextmanager
def cpu_verl():
    """The CPU platform and a one-process gloo group, both undone on exit."""
    previous = get_platform()
    set_platform(CPUPlatform())
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()
        set_platform(previous)


def cpu_engine(model: torch.nn.Module):
    """An `FSDPEngineWithLMHead` around an FSDP2-sharded copy of ``model`` (fp32, one rank, no
    sequence parallelism); call inside `cpu_verl`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    module = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in module.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)  # built by hand, not by a worker
    engine.module = module
    engine.ulysses_sequence_parallel_size = 1
    engine.ulysses_device_mesh = None
    engine.pad_to_length = False
    engine._autocast_dtype = torch.float32
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False,
                                           entropy_from_logits_with_chunking=False)
    engine.get_data_parallel_group = lambda: None
    engine.get_data_parallel_size = lambda: 1
    return engine


# What a TrainingWorker adds to a log-prob batch before ``engine.infer_batch`` (its defaults,
# with the padded path and fixed micro-batches).
WORKER_DEFAULTS = {"use_remove_padding": False, "use_dynamic_bsz": False,
                   "micro_batch_size_per_gpu": 4, "use_fused_kernels": False}
