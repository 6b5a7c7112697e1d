"""The SPD inference server: a Ray actor holding draft + target (frozen) and the judge.

It answers verl's token-in/token-out ``generate`` calls with judge-in-the-loop speculative
decoding (``spd_verl.spd``). verl's agent loop sends one sequence per request; the server collects
the requests that arrive within ``batch_window_ms`` and runs one batched engine call over them, as
an inference server batches. The judge's weights come from the actor on every ``update_weights``
(adapter-only or merged, verl's two LoRA sync modes).

Decision rule per request: temperature 0 (verl's validation default) or ``decision_mode=threshold``
→ accept iff σ(s) > ``score_threshold``; otherwise accept ~ Bernoulli(σ(s / T)). A request whose
sampling params carry ``spd_policy="reject_all"`` is decoded losslessly (the target's greedy text, by
the target alone: ``SpeculativeDecoder.generate_lossless``): the per-decision credit of
``credit.py`` continues its branches that way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.replica import TokenOutput

from ..scoring_model import decision_log_probs, export_judge
from ..spd import BernoulliPolicy, SpeculativeDecoder, ThresholdPolicy, run_gated
from .config import KEY, SPDRolloutConfig
from .judge import build_judge, lora_merged, wrap_lora
from .keys import DECISIONS_KEY, POLICY_PARAM, TARGET_LOGPROBS_KEY
from .weight_sync import load_synced_weights

logger = logging.getLogger(__name__)


class TemperedBernoulli(BernoulliPolicy):
    """accept ~ Bernoulli(σ(s / T)): verl's sampling temperature applied to the decision logit, so
    the actor's log-probs (computed from logits / T, as verl does for tokens) match the rollout."""

    def __init__(self, seed: int, temperature: float):
        super().__init__(seed)
        self.temperature = float(temperature)

    def decide(self, ctx):
        return super().decide(dataclasses.replace(ctx, logits=ctx.logits / self.temperature))


@dataclass
class _Request:
    prompt_ids: list
    key: tuple  # (mode, temperature): requests sharing it share an engine call (each with its own limit)
    limit: int  # max new tokens
    future: asyncio.Future


def _torch_dtype(name) -> torch.dtype:
    from verl.utils.torch_dtypes import PrecisionType

    return PrecisionType.to_dtype(name)


def _server_device() -> torch.device:
    from verl.utils.device import get_device_name

    name = get_device_name()
    if name != "cpu" and getattr(torch, name, None) is not None and getattr(torch, name).is_available():
        return torch.device(name, 0)
    return torch.device("cpu")


def load_frozen_lm(path, key: str, role: str, dtype: torch.dtype, device: torch.device, attn: str):
    if not path:
        raise ValueError(f"{KEY}.{key} is not set: the spd rollout needs the {role} model "
                         f"(a Hugging Face causal-LM checkpoint directory)")
    path = os.path.expanduser(str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except (OSError, ValueError) as e:
        raise ValueError(f"{KEY}.{key}={path!r}: cannot load the {role} model: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def _tokenizer_vocab(path):
    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError, TypeError):
        return None  # checkpoint without tokenizer files: only the vocab sizes are compared


def check_same_vocabulary(named_models: dict, actor_tokenizer=None) -> None:
    """Draft, target and judge must index one vocabulary (the actor tokenizer's)."""
    sizes = {role: int(m.config.vocab_size) for role, (m, _) in named_models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"draft/target/judge vocabularies differ: vocab_size {sizes} "
                         f"({ {role: p for role, (_, p) in named_models.items()} })")
    vocabs = {role: _tokenizer_vocab(p) for role, (_, p) in named_models.items()}
    if actor_tokenizer is not None:
        vocabs["actor tokenizer"] = actor_tokenizer.get_vocab()
    vocabs = {k: v for k, v in vocabs.items() if v is not None}
    roles = list(vocabs)
    for other in roles[1:]:
        a, b = vocabs[roles[0]], vocabs[other]
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise ValueError(f"tokenizer mismatch between {roles[0]} and {other}: {len(a)} vs {len(b)} tokens, "
                             f"e.g. differing (token, id) pairs {diff}; draft, target and actor must share one "
                             f"tokenizer")


def _eos_ids(model_config) -> list[int]:
    ids = []
    gen = getattr(model_config, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), getattr(model_config.tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.extend([src] if isinstance(src, int) else list(src))
    return sorted(set(int(i) for i in ids))


class SPDServer:
    """Ray actor (wrapped with ``ray.remote`` by the replica). Plain class: tests use it directly."""

    def __init__(self, config, model_config, replica_rank: int = 0):
        cfg = config if dataclasses.is_dataclass(config) else omega_conf_to_dataclass(config)
        if not isinstance(cfg, SPDRolloutConfig):
            raise TypeError(f"rollout name 'spd' needs {KEY}._target_=spd_verl.verl_ext.config.SPDRolloutConfig "
                            f"(got {type(cfg).__name__}); configs/spd_demo.yaml sets it")
        self.config = cfg
        self.model_config = model_config if dataclasses.is_dataclass(model_config) else \
            omega_conf_to_dataclass(model_config)
        self.replica_rank = replica_rank
        self.device = _server_device()
        if self.device.type == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        dtype = _torch_dtype(cfg.dtype)
        attn = dict(self.model_config.override_config or {}).get("attn_implementation", "sdpa")

        draft = load_frozen_lm(cfg.draft_model_path, "draft_model_path", "draft", dtype, self.device, attn)
        target = load_frozen_lm(cfg.target_model_path, "target_model_path", "target", dtype, self.device, attn)
        judge = build_judge(self.model_config, dtype=dtype)
        check_same_vocabulary({"draft": (draft, cfg.draft_model_path), "target": (target, cfg.target_model_path),
                               "judge": (judge, self.model_config.local_path)}, self.model_config.tokenizer)
        # Merged syncs carry plain ScoringModel weights; adapter syncs need the actor's LoRA layout.
        self.merged_sync = lora_merged(self.model_config)
        if not self.merged_sync:
            judge = wrap_lora(judge, self.model_config)
        self.judge = judge.to(self.device).eval().requires_grad_(False)
        self.decoder = SpeculativeDecoder(draft, target, judge=self.judge,
                                          num_speculative_tokens=cfg.num_speculative_tokens,
                                          draft_temperature=cfg.draft_temperature, seed=cfg.seed + replica_rank)
        self.eos_token_id = _eos_ids(self.model_config)
        self.global_steps = None
        self._rng = random.Random(cfg.seed * 1000 + replica_rank)
        self._queue: list[_Request] = []
        self._collector: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ generation
    def _request_key(self, sampling_params: dict) -> tuple[tuple, int]:
        """((mode, temperature), max new tokens) of one request."""
        temperature = float(sampling_params.get("temperature", self.config.temperature))
        if temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {temperature}")
        policy = sampling_params.get(POLICY_PARAM)
        if policy is not None and policy != "reject_all":
            raise ValueError(f"sampling param {POLICY_PARAM}={policy!r}: the spd server knows only 'reject_all'")
        if policy == "reject_all":
            mode = "lossless"
        else:
            mode = "threshold" if self.config.decision_mode == "threshold" or temperature == 0 else "sample"
        limit = sampling_params.get("max_tokens") or sampling_params.get("max_new_tokens") or \
            self.config.response_length
        return (mode, temperature if mode == "sample" else 1.0), int(min(limit, self.config.response_length))

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       **kwargs) -> TokenOutput:
        if image_data or video_data or kwargs.get("audio_data"):
            raise ValueError("the spd rollout is text-only: got image/video/audio inputs")
        key, limit = self._request_key(sampling_params or {})
        request = _Request(list(prompt_ids), key, limit, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect_and_run())
        return await request.future

    async def _collect_and_run(self):
        while self._queue:
            await asyncio.sleep(self.config.batch_window_ms / 1000.0)
            batch = self._queue[: self.config.max_batch_size]
            self._queue = self._queue[self.config.max_batch_size:]
            groups: dict[tuple, list[_Request]] = {}
            for r in batch:
                groups.setdefault(r.key, []).append(r)
            async with self._lock:
                for key, reqs in groups.items():
                    try:
                        outputs = await asyncio.to_thread(self._generate_group, key, [r.prompt_ids for r in reqs],
                                                          [r.limit for r in reqs])
                    except Exception as e:  # every waiting request learns why
                        for r in reqs:
                            if not r.future.done():
                                r.future.set_exception(e)
                        continue
                    for r, out in zip(reqs, outputs):
                        if not r.future.done():
                            r.future.set_result(out)

    def _generate_group(self, key: tuple, prompts: list[list[int]], limits: list[int]) -> list[TokenOutput]:
        mode, temperature = key
        if mode == "lossless":
            res = self.decoder.generate_lossless(prompts, max_new_tokens=limits, eos_token_id=self.eos_token_id)
            return [self._lossless_output(resp, lps, m, f, limit, len(prompts)) for resp, lps, m, f, limit in
                    zip(res.responses, res.target_logprobs, res.mismatches, res.target_forwards, limits)]
        if mode == "threshold":
            policy = run_gated(ThresholdPolicy(self.config.score_threshold), self.config.min_accept_run)
        else:
            policy = run_gated(TemperedBernoulli(self._rng.randrange(2**62), temperature), self.config.min_accept_run)
        result = self.decoder.generate(prompts, policy=policy, max_new_tokens=limits, eos_token_id=self.eos_token_id)
        outputs = [self._token_output(resp, rec, temperature, limit, mode, lps)
                   for resp, rec, limit, lps in zip(result.responses, result.decisions, limits,
                                                    result.target_logprobs)]
        for out in outputs:
            out.extra_fields["spd_batch_size"] = len(prompts)  # how many requests shared the engine call
        return outputs

    def _lossless_output(self, response, target_logprobs, mismatches, target_forwards, max_new_tokens,
                         batch_size) -> TokenOutput:
        """A lossless request's answer: the target's greedy text and what lossless SD would count for
        it. No decision records: no policy decided anything (every mismatch is rejected)."""
        finished, truncated = self._ending(response, max_new_tokens)
        extra = {"global_steps": self.global_steps, "spd_mismatches": mismatches, "spd_accepted_mismatches": 0,
                 "spd_forced_rejects": 0, "spd_accepted_run_tokens": 0, "spd_target_forwards": target_forwards,
                 "spd_truncated": truncated, "spd_decision_mode": "lossless",
                 TARGET_LOGPROBS_KEY: list(target_logprobs), "spd_batch_size": batch_size}
        return TokenOutput(token_ids=list(response), log_probs=[0.0] * len(response),
                           stop_reason="completed" if finished else "length", extra_fields=extra)

    def _ending(self, response, max_new_tokens) -> tuple[bool, bool]:
        """(finished with an EOS, stopped by the token budget instead)."""
        finished = bool(response) and response[-1] in self.eos_token_id
        return finished, (not finished) and len(response) >= max_new_tokens

    def _token_output(self, response, record, temperature, max_new_tokens, mode, target_logprobs) -> TokenOutput:
        log_probs = [0.0] * len(response)
        if record.positions:
            logits = torch.tensor(record.logits, dtype=torch.float32) / temperature
            lp, _ = decision_log_probs(logits, torch.tensor(record.actions, dtype=torch.float32))
            for pos, value, forced in zip(record.positions, lp.tolist(), record.forced):
                log_probs[pos] = 0.0 if math.isnan(value) or forced else value
        finished, truncated = self._ending(response, max_new_tokens)
        extra = {
            "global_steps": self.global_steps,
            DECISIONS_KEY: {
                "positions": list(record.positions), "draft_tokens": list(record.draft_tokens),
                "target_tokens": list(record.target_tokens), "actions": list(record.actions),
                "logits": list(record.logits), "features": [list(f) for f in record.features],
                "forced": list(record.forced), "runs": list(record.runs),
            },
            "spd_mismatches": record.mismatches,
            "spd_accepted_mismatches": record.accepted_mismatches,
            "spd_forced_rejects": record.forced_rejects,
            "spd_accepted_run_tokens": record.accepted_run_tokens,
            "spd_target_forwards": record.target_forwards,
            "spd_truncated": truncated,
            "spd_decision_mode": mode,
            TARGET_LOGPROBS_KEY: list(target_logprobs),  # the credit's soft risk reads these
        }
        return TokenOutput(token_ids=list(response), log_probs=log_probs,
                           stop_reason="completed" if finished else "length", extra_fields=extra)

    # ------------------------------------------------------------------ weights
    async def update_weights(self, named_tensors, peft_config=None, base_sync_done: bool = True,
                             global_steps=None, **kwargs):
        async with self._lock:
            await asyncio.to_thread(self.load_weights, dict(named_tensors), peft_config, base_sync_done)
        if global_steps is not None:
            self.global_steps = global_steps

    def load_weights(self, named: dict, peft_config=None, base_sync_done: bool = True) -> None:
        """Load a sync from the actor into the judge (names as verl's FSDP engine sends them)."""
        load_synced_weights(self.judge, named, peft_config=peft_config, base_sync_done=base_sync_done,
                            merged=self.merged_sync)

    # ------------------------------------------------------------------ export and lifecycle
    async def export_judge(self, out_dir: str) -> str:
        async with self._lock:
            return str(await asyncio.to_thread(export_judge, self.judge, out_dir))

    async def set_global_steps(self, global_steps):
        self.global_steps = global_steps

    # The models are small next to a vLLM engine and stay resident: sleep/wake and KV-cache
    # calls verl makes around weight syncs have nothing to free (the SD caches live per call).
    async def wake_up(self, tags=None, **kwargs):
        return None

    async def sleep(self, **kwargs):
        return None

    async def abort_all_requests(self, reject_request: bool = False, **kwargs):
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self, **kwargs):
        return None

    async def clear_kv_cache(self, **kwargs):
        return None

    async def release_kv_cache(self, **kwargs):
        return None

    async def resume_kv_cache(self, **kwargs):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self, **kwargs):
        return None

    async def ready(self) -> bool:
        return True
