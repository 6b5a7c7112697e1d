"""Loading what an evaluation needs: the held-out rows, prompt ids, and the three models.

Every failure here is a clear error naming the file or directory at fault: evaluation is the
command a user runs first, with paths typed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DATA_SOURCE = "spd_arith"  # spd_verl.world.problems.DATA_SOURCE


# ---------------------------------------------------------------- rows
def _plain(value):
    """numpy arrays / pyarrow structs from parquet -> plain lists and dicts."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def normalize_row(row: dict, index: int = 0) -> dict:
    """A verl row -> {"prompt": [chat messages], "ground_truth": str, "data_source": str}."""
    row = _plain(dict(row))
    if "prompt" not in row:
        raise ValueError(f"eval row {index} has no 'prompt' column (columns: {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and "content" in m for m in prompt):
        raise ValueError(f"eval row {index}: 'prompt' must be a list of {{'role', 'content'}} chat messages, "
                         f"got {type(prompt).__name__}")
    rm = row.get("reward_model")
    if isinstance(rm, str):
        try:
            rm = json.loads(rm)
        except json.JSONDecodeError:
            rm = None
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise ValueError(f"eval row {index} has no reward_model.ground_truth")
    return dict(prompt=prompt, ground_truth=str(rm["ground_truth"]), data_source=str(row.get("data_source", "")))


def load_rows(path, limit: int | None = None) -> list[dict]:
    """Rows of a verl parquet file, normalised (see normalize_row); the first ``limit`` only."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no eval data at {path}: expected a verl-format parquet file")
    df = pd.read_parquet(path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        df = df.head(limit)
    if len(df) == 0:
        raise ValueError(f"eval set {path} is empty: no rows to evaluate")
    return [normalize_row(r, i) for i, r in enumerate(df.to_dict("records"))]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template token ids of one prompt, as a plain list of ints (transformers 5 returns a
    BatchEncoding from ``apply_chat_template(tokenize=True)``, 4.x a list)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # a batch of one
        out = out[0]
    return [int(t) for t in out]


# ---------------------------------------------------------------- models
def world_dir() -> Path | None:
    """The embedded demo world (spd_verl/assets/world), or None when it is not built/installed."""
    try:
        from spd_verl.world import WORLD_DIR
    except ImportError:
        return None
    return Path(WORLD_DIR)


def resolve_world_defaults(draft, target, tokenizer, data) -> dict:
    """Fill unset paths from the demo world; a clear error when the world is needed but absent."""
    paths = dict(draft=draft, target=target, tokenizer=tokenizer, data=data)
    missing = [k for k in ("draft", "target", "data") if paths[k] is None]
    if missing:
        wd = world_dir()
        defaults = {} if wd is None else dict(draft=wd / "draft", target=wd / "target", data=wd / "data" / "test.parquet")
        for k in missing:
            if wd is None or not Path(defaults[k]).exists():
                where = "spd_verl.world.WORLD_DIR is not defined" if wd is None else f"{defaults[k]} does not exist"
                raise FileNotFoundError(
                    f"no --{k} given and the demo world is not available ({where}); build it with `spd-world` "
                    f"or pass --draft, --target and --data explicitly")
            paths[k] = defaults[k]
    if paths["tokenizer"] is None:
        # The target's directory, else a sibling tokenizer/ (the demo world ships it separately).
        target_dir, sibling = Path(paths["target"]), Path(paths["target"]).parent / "tokenizer"
        paths["tokenizer"] = sibling if not _has_tokenizer(target_dir) and _has_tokenizer(sibling) else target_dir
    return {k: Path(v) for k, v in paths.items()}


def _has_tokenizer(d) -> bool:
    d = Path(d)
    return any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_causal_lm(path, role: str, device="cpu"):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no {role} model at {path}: expected a Hugging Face checkpoint with config.json")
    return AutoModelForCausalLM.from_pretrained(path).to(device).eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not _has_tokenizer(path):
        raise FileNotFoundError(f"no tokenizer at {path}: expected tokenizer.json / tokenizer_config.json "
                                f"(pass --tokenizer)")
    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"tokenizer at {path} has no chat template: the eval prompts are chat messages")
    return tok


def load_eval_judge(path, target, device="cpu"):
    """The trained judge (a ScoringModel export), checked against the target's vocabulary."""
    from spd_verl.scoring_model import ScoringConfig, load_judge

    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type != ScoringConfig.model_type:
            raise ValueError(f"judge at {path} is not a ScoringModel export (model_type={model_type!r}, expected "
                             f"{ScoringConfig.model_type!r}); export a judge with spd_verl.scoring_model.export_judge")
    judge = load_judge(path).to(device).eval()
    check_judge_vocab(judge, target, path)
    return judge


def check_judge_vocab(judge, target, judge_path="<judge>") -> None:
    vj, vt = int(judge.config.vocab_size), int(target.config.vocab_size)
    if vj != vt:
        raise ValueError(f"judge at {judge_path} has vocab_size={vj} but the target has vocab_size={vt}: "
                         f"the judge's backbone must share the target's vocabulary")


def check_tokenizer_vocab(tokenizer, target, tokenizer_path="<tokenizer>") -> None:
    n, vt = len(tokenizer), int(target.config.vocab_size)
    if n > vt:
        raise ValueError(f"tokenizer at {tokenizer_path} has {n} tokens but the target has vocab_size={vt}: "
                         f"they do not belong together")


def eos_token_id(tokenizer, target):
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        gen = getattr(target, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(target.config, "eos_token_id", None)
    return eos
