"""verl rollout ``spd``: the adapter living in the actor worker and the replica that launches the
SPD server actor (``server.SPDServer``).

- ``SpeculativeDecodingRollout`` (``_ROLLOUT_REGISTRY[("spd", "async")]``): receives the judge's
  weights from the actor (``update_weights``) and forwards them to its replica's server.
- ``SPDReplica`` (``RolloutReplicaRegistry["spd"]``): starts one server per replica, next to the
  replica's worker, and hands verl the handle the agent loops send ``generate`` requests to.
"""

from __future__ import annotations

import logging
import os

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica
from verl.workers.rollout.utils import ensure_async_iterator

from .config import KEY

logger = logging.getLogger(__name__)

ROLLOUT_NAME = "spd"


def server_actor_name(replica_rank: int) -> str:
    return f"spd_server_{replica_rank}"


def _check_single_process(config) -> None:
    world = config.tensor_model_parallel_size * config.data_parallel_size * config.pipeline_model_parallel_size
    if world != 1:
        raise ValueError(f"the spd rollout runs each replica in one process: set {KEY}.tensor_model_parallel_size=1 "
                         f"(and data/pipeline parallel size 1); got a replica world size of {world}. "
                         f"Data parallelism comes from one replica per training worker.")


class SpeculativeDecodingRollout(BaseRollout):
    """Adapter in the actor worker: forwards the judge's weights to the SPD server."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        _check_single_process(self.config)
        rank = int(os.environ.get("RANK", 0))
        self.replica_rank = rank if replica_rank == -1 else replica_rank
        self.is_leader_rank = True
        self.sleep_level = 1
        self._server = None

    @property
    def server(self):
        # The server starts after the hybrid workers (verl launches replicas last): look it up lazily.
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def update_weights(self, weights, peft_config=None, base_sync_done: bool = True, global_steps=None,
                             wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"the spd rollout takes full named tensors, got wire_format={wire_format!r}; "
                             f"use {KEY}.checkpoint_engine.backend=naive")
        named = {}
        async for name, tensor in ensure_async_iterator(weights):
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            named[name] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
        await self.server.update_weights.remote(named, peft_config=peft_config, base_sync_done=base_sync_done,
                                                global_steps=global_steps)

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None


class SPDReplica(RolloutReplica):
    """One SPD server per replica (a replica = one training worker in hybrid mode)."""

    async def launch_servers(self):
        from .server import SPDServer

        _check_single_process(self.config)
        options = dict(name=server_actor_name(self.replica_rank), max_concurrency=self.max_concurrency)
        if self.workers:
            # Same node as the replica's worker; on accelerators, the worker's device.
            from verl.utils.device import get_resource_name, get_visible_devices_keyword

            node_id, devices = await self.workers[0].__ray_call__.remote(
                lambda _self: (ray.get_runtime_context().get_node_id(),
                               ray.get_runtime_context().get_accelerator_ids().get(get_resource_name(), [])))
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False)
            if devices:
                keyword = get_visible_devices_keyword()
                options["runtime_env"] = {"env_vars": {keyword: ",".join(str(d) for d in devices),
                                                       f"RAY_EXPERIMENTAL_NOSET_{keyword}": "1"}}
        server = ray.remote(SPDServer).options(**options).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        await server.ready.remote()  # surfaces model-loading errors here, at startup
        self.servers = [server]
        self._server_handle = server
        self._server_address = server_actor_name(self.replica_rank)

    async def export_judge(self, out_dir: str) -> str:
        return await self._server_handle.export_judge.remote(out_dir)


def load_replica_class():
    return SPDReplica
