"""Shared fixtures: a tiny spd world (word-level tokenizer with a chat template, random target and
perturbed draft Llamas, verl-format parquet rows) built in seconds, so tests never wait for the
real demo world. ``build_tiny_world`` is also used by the subprocess tests of main_ppo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# The suite runs on CPU: verl must pick spd_verl's CPU platform, which is resolved once per process
# on first use, so it is chosen here, before any test imports verl.
os.environ.setdefault("VERL_PLATFORM", "cpu")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["Q", "A", ":", "what", "is", "plus", "minus", "the", "answer", "so", "####"] + [str(d) for d in range(10)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = len(SPECIALS) + len(WORDS)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = ("{{ bos_token }}{% for m in messages %}Q : {{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %} A :{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=template, clean_up_tokenization_spaces=False)


def _llama(seed: int, layers: int, hidden: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _rows(n: int, offset: int, ground_truth: bool = True) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = (offset + i) % 10, (offset + 3 * i) % 10
        rm = {"style": "rule", "ground_truth": str(a + b)} if ground_truth else {"style": "rule"}
        rows.append({"data_source": "spd_arith", "ability": "math",
                     "prompt": [{"role": "user", "content": f"what is {a} plus {b}"}],
                     "reward_model": rm, "extra_info": {"index": offset + i, "split": "test"}})
    return rows


def write_parquet(rows: list[dict], path) -> str:
    import pandas as pd

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def build_tiny_world(root) -> dict:
    """root/{target,draft}: HF checkpoints with the tokenizer; root/data/{train,val}.parquet."""
    import torch

    root = Path(root)
    if (root / "data" / "val.parquet").exists():
        return world_paths(root)
    tok = _tokenizer()
    target = _llama(seed=0, layers=2, hidden=32)
    draft = _llama(seed=0, layers=2, hidden=32)
    with torch.no_grad():  # a draft that agrees with the target often, not always
        g = torch.Generator().manual_seed(1)
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.std().clamp(min=1e-3))
        # Make EOS likely enough that some rollouts of a prompt end early and others hit the
        # length cap: GRPO groups then have reward variance (measured: ~60% truncated at 16 tokens).
        for model in (target, draft):
            w = model.lm_head.weight
            direction = w.mean(0) / w.mean(0).norm()
            w[2] += direction * w.norm(dim=1).mean()
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_parquet(_rows(8, 0), root / "data" / "train.parquet")
    write_parquet(_rows(4, 100), root / "data" / "val.parquet")
    return world_paths(root)


def world_paths(root) -> dict:
    root = Path(root)
    return dict(root=str(root), target=str(root / "target"), draft=str(root / "draft"),
                train=str(root / "data" / "train.parquet"), val=str(root / "data" / "val.parquet"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return build_tiny_world(tmp_path_factory.mktemp("spd_world"))


@pytest.fixture(scope="session")
def dist_group():
    """A one-process gloo group initialised the way verl's workers do it (through the patched
    ``initialize_global_process_group_ray``), for in-process engine tests."""
    import socket

    import torch.distributed
    import verl.workers.engine_workers as engine_workers

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        engine_workers.initialize_global_process_group_ray(timeout_second=None)
    yield
