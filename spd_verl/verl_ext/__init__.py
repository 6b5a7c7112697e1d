"""spd_verl's verl integration (DESIGN.md §9). Importing this package starts nothing.

register.py   — the ``verl.plugins`` entry point: registers everything below in every process
cpu_platform  — verl device platform ``cpu`` (VERL_PLATFORM=cpu) + the one verl patch (gloo)
config        — SPDRolloutConfig: the ``spd`` rollout's keys under actor_rollout_ref.rollout
server        — SPDServer: Ray actor running batched judge-in-the-loop speculative decoding
weight_sync   — loads the actor's adapter-only / base / merged weight syncs into the server's judge
rollout       — rollout ``spd``: adapter in the actor worker (weight sync) + replica (launch)
agent_loop    — agent loop ``spd_agent``: decisions -> response_mask / rollout_log_probs / spd_* fields
engine        — EngineRegistry model_type ``spd_scoring``: FSDP engine returning decision log-probs
trainer       — trainer mode ``spd`` (SPDRayTrainer): SPD metrics, judge export at checkpoints
reward_manager— reward manager ``spd``
judge, keys, metrics — shared helpers
"""
