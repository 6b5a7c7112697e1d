"""The decision-level actor engine against the rollout server, in one process (no Ray):

- replay invariant: decisions made by the server, carried through the agent loop's batch fields,
  recomputed by the engine give the rollout's log-probs (ratio 1 at step 0), padded and packed;
- weight sync actor -> server, adapter-only and merged;
- a sequence without decisions contributes no gradient; a batch without any gives loss 0, no NaN.
"""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

TEMPERATURE = 0.8  # != 1 so that the temperature path is exercised too


def _dc(d: dict):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(OmegaConf.create(d))


def model_config(world, merge=False):
    return _dc({"_target_": "verl.workers.config.HFModelConfig", "path": world["draft"], "model_type": "spd_scoring",
                "lora_rank": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_remove_padding": False,
                "enable_gradient_checkpointing": False, "lora": {"merge": merge},
                "override_config": {"attn_implementation": "sdpa", "init_accept_prob": 0.4}})


def make_engine(mc):
    from verl.workers.engine import EngineRegistry

    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine = EngineRegistry.new(
        model_type="spd_scoring", backend="fsdp2", model_config=mc,
        engine_config=_dc({"_target_": "verl.workers.config.FSDPEngineConfig", "strategy": "fsdp2",
                           "use_torch_compile": False, "model_dtype": "fp32", "mixed_precision": fp32}),
        optimizer_config=_dc({"_target_": "verl.workers.config.FSDPOptimizerConfig", "lr": 1e-2,
                              "total_training_steps": 10}),
        checkpoint_config=_dc({"_target_": "verl.trainer.config.CheckpointConfig"}))
    engine.initialize()
    with torch.no_grad():  # a non-trivial judge: zero head weights would hide any misalignment
        g = torch.Generator().manual_seed(0)
        for p in engine.module.parameters():
            if p.requires_grad:  # world size 1: the local shard is the whole tensor
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_((torch.randn(local.shape, generator=g) * 0.3).to(p.dtype))
    return engine


def make_server(world, mc):
    from spd_verl.verl_ext.config import SPDRolloutConfig
    from spd_verl.verl_ext.server import SPDServer

    cfg = SPDRolloutConfig(name="spd", tensor_model_parallel_size=1, draft_model_path=world["draft"],
                           target_model_path=world["target"], dtype="float32", response_length=16,
                           prompt_length=32, num_speculative_tokens=3)
    return SPDServer(cfg, mc)


def sync(engine, server):
    params, peft_config = engine.get_per_tensor_param(layered_summon=False, base_sync_done=True)
    server.load_weights(dict(params), peft_config, True)


def rollout(server, prompts, temperature=TEMPERATURE):
    async def go():
        return await asyncio.gather(*[server.generate(str(i), prompt_ids=p, sampling_params={"temperature": temperature})
                                      for i, p in enumerate(prompts)])
    return asyncio.run(go())


def to_batch(prompts, outputs):
    """What verl's V1 agent-loop worker stores per sample (AgentLoopOutput.as_dict + ids)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics

    from spd_verl.verl_ext.agent_loop import SPDAgentLoopOutput, decision_fields
    from spd_verl.verl_ext.keys import DECISIONS_KEY

    rows = []
    for prompt, out in zip(prompts, outputs):
        fields = decision_fields(out.extra_fields[DECISIONS_KEY], len(out.token_ids))
        d = SPDAgentLoopOutput(prompt_ids=prompt, response_ids=out.token_ids, response_logprobs=out.log_probs,
                               metrics=AgentLoopMetrics(), num_turns=2, **fields).as_dict()
        d["input_ids"] = torch.cat([d["prompts"], d["responses"]])
        d["position_ids"] = torch.arange(len(d["input_ids"]))
        d["loss_mask"] = d["response_mask"]
        rows.append(d)
    return rows


def nested_batch(rows, **non_tensor):
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    keys = ["prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids", "rollout_log_probs",
            "spd_draft_tokens", "spd_target_tokens", "spd_actions", "spd_old_logits", "spd_features"]
    data = TensorDict({k: torch.nested.as_nested_tensor([r[k] for r in rows], layout=torch.jagged) for k in keys},
                      batch_size=[len(rows)])
    defaults = dict(temperature=TEMPERATURE, calculate_entropy=True, use_dynamic_bsz=False, use_fused_kernels=False,
                    micro_batch_size_per_gpu=2, use_remove_padding=False)
    tu.assign_non_tensor(data, **{**defaults, **non_tensor})
    return data


def engine_response_outputs(engine, data):
    from verl.workers.utils.padding import response_from_nested

    with engine.eval_mode():
        out = engine.infer_batch(data)
    lp = response_from_nested(out["model_output"]["log_probs"], data["response_mask"])
    ent = response_from_nested(out["model_output"]["entropy"], data["response_mask"])
    return lp.unbind(0), ent.unbind(0)


@pytest.fixture(scope="module")
def prompts():
    from conftest import _tokenizer

    tok = _tokenizer()
    texts = ["what is 3 plus 4", "what is 9 minus 2 so", "what is 1 plus 1", "the answer is"]
    return [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for t in texts]


@pytest.fixture(scope="module")
def adapter_pair(tiny_world, dist_group):
    mc = model_config(tiny_world)
    engine, server = make_engine(mc), make_server(tiny_world, mc)
    sync(engine, server)
    return engine, server


@pytest.mark.parametrize("remove_padding", [False, True])
def test_replay_invariant_engine_equals_rollout(adapter_pair, prompts, remove_padding):
    from spd_verl.scoring_model import decision_log_probs

    engine, server = adapter_pair
    outputs = rollout(server, prompts)
    assert [o.extra_fields["spd_batch_size"] for o in outputs] == [len(prompts)] * len(prompts)  # one batch
    rows = to_batch(prompts, outputs)
    assert sum(int(r["response_mask"].sum()) for r in rows) > 5, "the tiny world should produce decisions"
    # Packed batches with sdpa would mix sequences: one sequence per micro-batch keeps them exact.
    data = nested_batch(rows, use_remove_padding=remove_padding, micro_batch_size_per_gpu=1 if remove_padding else 2)
    log_probs, entropies = engine_response_outputs(engine, data)
    for row, lp, ent in zip(rows, log_probs, entropies):
        mask = row["response_mask"].bool()
        torch.testing.assert_close(lp[mask], row["rollout_log_probs"][mask], atol=1e-5, rtol=1e-5)
        _, expected_entropy = decision_log_probs(row["spd_old_logits"] / TEMPERATURE, row["spd_actions"])
        torch.testing.assert_close(ent[mask], expected_entropy[mask], atol=1e-5, rtol=1e-5)
        # non-decision positions are masked everywhere in verl; they must at least be finite
        assert torch.isfinite(lp).all()


def test_padding_sample_with_foreign_side_tensors(adapter_pair, prompts):
    """verl pads a batch with copies of a real sample that have a 1-token response but keep the
    real sample's side tensors: the engine must fit them, not crash."""
    engine, server = adapter_pair
    rows = to_batch(prompts[:1], rollout(server, prompts[:1]))
    pad = dict(rows[0])
    pad.update(responses=torch.tensor([2]), response_mask=torch.tensor([0]), loss_mask=torch.tensor([0]),
               rollout_log_probs=torch.tensor([0.0]), prompts=torch.full((7,), 2))
    pad["input_ids"] = torch.cat([pad["prompts"], pad["responses"]])
    pad["position_ids"] = torch.arange(8)
    log_probs, _ = engine_response_outputs(engine, nested_batch([rows[0], pad]))
    assert log_probs[1].shape == (1,)
    mask = rows[0]["response_mask"].bool()
    torch.testing.assert_close(log_probs[0][mask], rows[0]["rollout_log_probs"][mask], atol=1e-5, rtol=1e-5)


def test_merged_weight_sync(tiny_world, dist_group, prompts):
    from spd_verl.verl_ext.judge import build_judge, wrap_lora

    mc = model_config(tiny_world, merge=True)
    engine, server = make_engine(mc), make_server(tiny_world, mc)
    assert not hasattr(server.judge, "peft_config")  # merged syncs load into a plain ScoringModel
    params, peft_config = engine.get_per_tensor_param()
    assert peft_config is None
    server.load_weights(dict(params), peft_config, True)
    # Reference: the actor's LoRA merged by peft, outside verl.
    reference = wrap_lora(build_judge(mc), mc)
    reference.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v
                               for k, v in engine.module.state_dict().items()})
    merged = reference.merge_and_unload().state_dict()
    loaded = server.judge.state_dict()
    assert set(loaded) == set(merged)
    for key, value in loaded.items():
        # verl sends merged FSDP weights as bf16: equal up to that rounding
        torch.testing.assert_close(value, merged[key], rtol=1e-2, atol=1e-5, msg=key)
    rows = to_batch(prompts, rollout(server, prompts))
    log_probs, _ = engine_response_outputs(engine, nested_batch(rows))
    for row, lp in zip(rows, log_probs):
        mask = row["response_mask"].bool()
        torch.testing.assert_close(lp[mask], row["rollout_log_probs"][mask], atol=0.1, rtol=0)


def test_adapter_sync_moves_server_judge(adapter_pair, prompts):
    """After an actor update, an adapter-only sync makes the server reproduce the new actor."""
    engine, server = adapter_pair
    rows = to_batch(prompts, rollout(server, prompts))
    before, _ = engine_response_outputs(engine, nested_batch(rows))
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            if "score_head" in name and p.requires_grad:
                p.add_(0.5)
    sync(engine, server)
    rows = to_batch(prompts, rollout(server, prompts))
    after, _ = engine_response_outputs(engine, nested_batch(rows))
    for row, lp in zip(rows, after):
        mask = row["response_mask"].bool()
        torch.testing.assert_close(lp[mask], row["rollout_log_probs"][mask], atol=1e-5, rtol=1e-5)


def _train_batch(rows, advantages):
    import copy

    for row, adv in zip(rows, advantages):
        row["advantages"] = torch.full(row["response_mask"].shape, float(adv))
        row["old_log_probs"] = row["rollout_log_probs"].clone()
    data = nested_batch([copy.copy(r) for r in rows], micro_batch_size_per_gpu=len(rows))
    from verl.utils import tensordict_utils as tu

    for key in ("advantages", "old_log_probs"):
        data[key] = torch.nested.as_nested_tensor([r[key] for r in rows], layout=torch.jagged)
    tu.assign_non_tensor(data, global_batch_size=len(rows))
    return data


def _ppo_loss():
    from verl.workers.utils.losses import ppo_loss

    actor = _dc({"_target_": "verl.workers.config.FSDPActorConfig", "strategy": "fsdp2", "ppo_mini_batch_size": 2,
                 "ppo_micro_batch_size_per_gpu": 2, "rollout_n": 1, "use_kl_loss": False, "entropy_coeff": 0.0,
                 "loss_agg_mode": "token-mean",
                 "optim": {"_target_": "verl.workers.config.FSDPOptimizerConfig", "lr": 0.0}})
    return partial(ppo_loss, config=actor)


def _grads(engine, data):
    engine.optimizer_zero_grad()
    with engine.train_mode():
        out = engine.forward_backward_batch(data, _ppo_loss(), forward_only=False)
        grads = {n: p.grad.full_tensor().clone() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                 for n, p in engine.module.named_parameters() if p.grad is not None}
    return out, grads


def test_sequence_without_decisions_gives_no_gradient(adapter_pair, prompts):
    engine, server = adapter_pair
    rows = [r for r in to_batch(prompts, rollout(server, prompts)) if r["response_mask"].sum() > 0][:1]
    assert rows, "need a sequence with decisions"
    quiet = dict(rows[0])
    quiet["response_mask"] = quiet["loss_mask"] = torch.zeros_like(rows[0]["response_mask"])
    _, alone = _grads(engine, _train_batch([dict(rows[0])], [1.0]))
    _, both = _grads(engine, _train_batch([dict(rows[0]), quiet], [1.0, -3.0]))
    assert alone and any(g.abs().sum() > 0 for g in alone.values())
    for name in alone:
        torch.testing.assert_close(both[name], alone[name], atol=1e-6, rtol=1e-5)
    # a batch without a single decision: zero loss, zero gradient, nothing NaN
    out, none = _grads(engine, _train_batch([quiet, dict(quiet)], [1.0, -1.0]))
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in none.values())


def test_base_weight_sync(adapter_pair, prompts):
    """load_format=dummy makes verl send the frozen base once (names with ``.base_layer``)."""
    engine, server = adapter_pair
    params, peft_config = engine.get_per_tensor_param(layered_summon=False, base_sync_done=False)
    params = dict(params)
    assert any(".base_layer." in name for name in params)
    server.load_weights(params, peft_config, False)
    sync(engine, server)
    rows = to_batch(prompts, rollout(server, prompts))
    log_probs, _ = engine_response_outputs(engine, nested_batch(rows))
    for row, lp in zip(rows, log_probs):
        mask = row["response_mask"].bool()
        torch.testing.assert_close(lp[mask], row["rollout_log_probs"][mask], atol=1e-5, rtol=1e-5)


def test_exported_judge_continues_as_actor(adapter_pair, tiny_world, tmp_path, prompts):
    """The server's Hugging Face export is a valid actor_rollout_ref.model.path (a run can start
    from a previous judge): rebuilt through the actor's recipe it scores like the server's judge."""
    from spd_verl.spd import NUM_FEATURES
    from spd_verl.verl_ext.judge import build_judge

    _, server = adapter_pair
    path = asyncio.run(server.export_judge(str(tmp_path / "judge")))
    mc = _dc({"_target_": "verl.workers.config.HFModelConfig", "path": path, "tokenizer_path": tiny_world["draft"],
              "override_config": {"attn_implementation": "sdpa"}})
    assert mc.hf_config.model_type == "spd_scoring"
    rebuilt = build_judge(mc).eval()
    ids = torch.tensor([prompts[0] + [5, 9, 12, 4]])
    cands = torch.randint(0, 20, ids.shape, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(*ids.shape, NUM_FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = server.judge(input_ids=ids, draft_tokens=cands, target_tokens=cands.flip(1), features=feats).logits
        got = rebuilt(input_ids=ids, draft_tokens=cands, target_tokens=cands.flip(1), features=feats).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_threshold_requests_go_through_the_run_gate(adapter_pair, prompts):
    """Requests at temperature 0 use the threshold rule, behind rollout.min_accept_run when > 1."""
    from spd_verl.spd import RunGated, ThresholdPolicy

    _, server = adapter_pair
    saved = server.config.score_threshold, server.config.min_accept_run
    try:
        object.__setattr__(server.config, "score_threshold", 0.01)  # accept (nearly) every mismatch
        outs = {}
        for m in (1, 2):
            object.__setattr__(server.config, "min_accept_run", m)
            outs[m] = [o.token_ids for o in rollout(server, prompts, temperature=0)]
            policy = ThresholdPolicy(0.01) if m == 1 else RunGated(ThresholdPolicy(0.01), m)
            direct = server.decoder.generate(prompts, policy, max_new_tokens=server.config.response_length,
                                             eos_token_id=server.eos_token_id)
            assert outs[m] == direct.responses
        assert outs[1] != outs[2]  # the gate changed what was accepted
    finally:
        object.__setattr__(server.config, "score_threshold", saved[0])
        object.__setattr__(server.config, "min_accept_run", saved[1])


def test_sampled_requests_behind_the_run_gate_train_only_on_real_decisions(adapter_pair, prompts):
    """With rollout.min_accept_run > 1, training rollouts sample behind the gate too. The gate's
    forced rejects reach the batch with decision mask 0 and log-prob 0 (no gradient); the actor's
    log-probs still equal the rollout's at every real decision."""
    from spd_verl.verl_ext.keys import DECISIONS_KEY

    engine, server = adapter_pair
    saved = server.config.min_accept_run
    try:
        object.__setattr__(server.config, "min_accept_run", 2)
        outs = rollout(server, prompts * 3)
    finally:
        object.__setattr__(server.config, "min_accept_run", saved)
    rows = to_batch(prompts * 3, outs)
    n_forced = n_real = 0
    for out, row in zip(outs, rows):
        rec = out.extra_fields[DECISIONS_KEY]
        assert out.extra_fields["spd_forced_rejects"] == sum(rec["forced"])
        assert out.extra_fields["spd_mismatches"] == len(rec["positions"])
        assert out.extra_fields["spd_accepted_run_tokens"] == sum(r for r, a in zip(rec["runs"], rec["actions"]) if a)
        for p, a, f in zip(rec["positions"], rec["actions"], rec["forced"]):
            assert row["response_mask"][p] == (0 if f else 1)
            if f:
                assert a == 0 and out.log_probs[p] == 0.0
        n_forced += sum(rec["forced"])
        n_real += len(rec["forced"]) - sum(rec["forced"])
    assert n_forced > 0 and n_real > 0
    log_probs, _ = engine_response_outputs(engine, nested_batch(rows))
    for row, lp in zip(rows, log_probs):
        mask = row["response_mask"].bool()
        torch.testing.assert_close(lp[mask], row["rollout_log_probs"][mask], atol=1e-5, rtol=1e-5)


def test_head_lr_mult_puts_the_head_in_its_own_group(tiny_world, dist_group):
    mc = model_config(tiny_world)
    mc.override_config["head_lr_mult"] = 5.0
    engine = make_engine(mc)
    groups = engine.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 5e-2])
    names = {id(p): n for n, p in engine.module.named_parameters()}
    assert all("score_head" in names[id(p)] for p in groups[1]["params"]) and groups[1]["params"]
    assert all("lora_" in names[id(p)] for p in groups[0]["params"]) and groups[0]["params"]
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(trainable)


@pytest.mark.parametrize("bad", [0, -1.0, "fast", float("nan")])
def test_bad_head_lr_mult_is_refused(tiny_world, bad):
    mc = model_config(tiny_world)
    mc.override_config["head_lr_mult"] = bad
    with pytest.raises(ValueError, match="head_lr_mult must be a positive number"):
        make_engine(mc)
