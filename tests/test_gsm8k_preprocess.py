import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

_spec = importlib.util.spec_from_file_location(
    "preprocess_gsm8k", Path(__file__).parents[1] / "examples" / "gsm8k" / "preprocess_gsm8k.py")
pre = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pre)


def test_local_jsonl_to_verl_rows(tmp_path):
    rows = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
            {"question": "Big?", "answer": "so\n#### 1,200"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pre.main(["--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl"),
              "--out", str(tmp_path / "out")])
    df = pd.read_parquet(tmp_path / "out" / "test.parquet")
    assert list(df["data_source"]) == ["openai/gsm8k"] * 2
    assert [r["ground_truth"] for r in df["reward_model"]] == ["5", "1200"]
    assert df["prompt"][0][0]["role"] == "user" and "####" in df["prompt"][0][0]["content"]


def test_row_without_final_answer_is_named():
    with pytest.raises(ValueError, match="test row 1 has no '#### <answer>' line"):
        pre.to_rows(pd.DataFrame({"question": ["a", "b"], "answer": ["#### 1", "no answer"]}), "test")
