"""GSM8K -> verl parquet rows for spd_verl (data_source "openai/gsm8k").

From local files (the Hugging Face dataset's parquet or jsonl: columns ``question``, ``answer``
with a final ``#### n`` line) or, when online, from the hub:

    python examples/gsm8k/preprocess_gsm8k.py --train train.jsonl --test test.jsonl --out ~/data/gsm8k
    python examples/gsm8k/preprocess_gsm8k.py --from-hub --out ~/data/gsm8k
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from spd_verl.reward import extract_answer

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def read_split(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GSM8K split not found: {path}")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    raise ValueError(f"unsupported GSM8K file type {path.suffix!r} (expected .parquet, .jsonl or .json)")


def to_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    missing = {"question", "answer"} - set(df.columns)
    if missing:
        raise ValueError(f"GSM8K {split} split lacks columns {sorted(missing)}")
    rows = []
    for i, (q, a) in enumerate(zip(df["question"], df["answer"])):
        gt = extract_answer(a)
        if gt is None:
            raise ValueError(f"GSM8K {split} row {i} has no '#### <answer>' line: {a[-80:]!r}")
        rows.append(dict(
            data_source="openai/gsm8k",
            prompt=[{"role": "user", "content": f"{q} {INSTRUCTION}"}],
            ability="math",
            reward_model={"style": "rule", "ground_truth": gt.replace(",", "")},
            extra_info={"split": split, "index": i, "question": q, "answer": a},
        ))
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train")
    ap.add_argument("--test")
    ap.add_argument("--from-hub", action="store_true", help="download openai/gsm8k (needs the internet)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_hub:
        from datasets import load_dataset

        ds = load_dataset("openai/gsm8k", "main")
        splits = {"train": ds["train"].to_pandas(), "test": ds["test"].to_pandas()}
    else:
        if not (args.train and args.test):
            ap.error("give --train and --test files, or --from-hub")
        splits = {"train": read_split(args.train), "test": read_split(args.test)}
    for name, df in splits.items():
        rows = to_rows(df, name)
        rows.to_parquet(out / f"{name}.parquet")
        print(f"{name}: {len(rows)} rows -> {out / f'{name}.parquet'}")


if __name__ == "__main__":
    main()
