"""The demo world: a self-built arithmetic word-problem dataset, a word-level tokenizer, a tiny
target Llama and a weaker draft Llama sharing it (DESIGN.md §8).

The built world is committed under ``spd_verl/assets/world`` so nobody has to rebuild it; rebuild
with ``spd-world`` (or ``python -m spd_verl.world``). Importing this module loads nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORLD_DIR = Path(__file__).resolve().parent.parent / "assets" / "world"


@dataclass
class World:
    tokenizer: object
    draft: object
    target: object
    path: Path
    eos_token_id: int

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def draft_path(self) -> Path:
        return self.path / "draft"

    @property
    def target_path(self) -> Path:
        return self.path / "target"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer"

    def split(self, name: str) -> str:
        """Path of a parquet split: 'train', 'val', 'test' or 'calib' (threshold calibration)."""
        return str(self.data_dir / f"{name}.parquet")


def load_world(path: str | Path | None = None, device: str = "cpu") -> World:
    """Load the built world (tokenizer + eval-mode draft and target) from ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = Path(path) if path is not None else WORLD_DIR
    if not (root / "target").is_dir():
        raise FileNotFoundError(f"no world at {root}: build it with `spd-world --out {root}`")
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    models = {}
    for name in ("draft", "target"):
        m = LlamaForCausalLM.from_pretrained(str(root / name), dtype=torch.float32)
        models[name] = m.to(device).eval()
    return World(tokenizer=tok, draft=models["draft"], target=models["target"], path=root,
                 eos_token_id=int(tok.eos_token_id))


__all__ = ["WORLD_DIR", "World", "load_world"]
