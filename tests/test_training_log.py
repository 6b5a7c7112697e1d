"""The training curve read back from verl's file logger (spd_verl.eval.training_log, spd-train)."""

import csv
import json
import time

import pytest

from spd_verl.eval.training_log import curve_table, load_metrics, write_metrics_csv


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(path, steps=25):
    """A file-logger JSONL like verl's: validation at 0 and 20 as records of their own."""
    records = [{"step": 0, "data": {"val-spd/tau": 3.5, "val-spd/accuracy": 0.99}}]
    for s in range(1, steps + 1):
        records.append({"step": s, "data": {"spd/tau": 4.0 + s / 100, "spd/accepted_mismatch_rate": s / 100,
                                            "spd/accuracy": 1.0, "actor/grad_norm": 0.1, "training/epoch": 0}})
    records.append({"step": 20, "data": {"val-spd/tau": 5.25, "val-spd/accuracy": 0.98}})
    return _write(path, records)


def test_load_metrics_merges_the_records_of_a_step(tmp_path):
    records = load_metrics(_run(tmp_path / "m.jsonl"))
    assert [r["step"] for r in records] == list(range(26))
    assert records[20]["spd/tau"] == pytest.approx(4.2) and records[20]["val-spd/tau"] == 5.25
    assert "spd/tau" not in records[0]


def test_curve_table_rows_and_columns(tmp_path):
    table = curve_table(load_metrics(_run(tmp_path / "m.jsonl")), every=10).splitlines()
    assert table[0] == "| step | tau | acc.mm | acc | val tau | val acc |"  # only columns some step logged
    assert [line.split("|")[1].strip() for line in table[2:]] == ["0", "1", "10", "20", "25"]
    assert table[5] == "| 20 | 4.200 | 20.0% | 100.0% | 5.250 | 98.0% |"
    assert table[2] == "| 0 |  |  |  | 3.500 | 99.0% |"
    assert curve_table([{"step": 1, "actor/grad_norm": 0.1}]) == ""
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        curve_table([], every=0)


def test_metrics_csv_has_every_numeric_metric(tmp_path):
    out = write_metrics_csv(load_metrics(_run(tmp_path / "m.jsonl", steps=3)), tmp_path / "m.csv")
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[0] == "step" and {"actor/grad_norm", "spd/tau", "val-spd/tau"} <= set(rows[0])
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "20"] and float(rows[2]["spd/tau"]) == pytest.approx(4.02)


def test_a_line_that_is_not_a_record_is_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "data": {"spd/tau": 4.0}}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"m.jsonl, line 2: not a verl file-logger record"):
        load_metrics(path)


def test_spd_train_shows_the_curve_and_writes_the_csv(tmp_path, capsys):
    from spd_verl.train import show_training_curve

    show_training_curve(_run(tmp_path / "metrics.jsonl"), tmp_path / "training_metrics.csv")
    out = capsys.readouterr().out
    assert "training curve" in out and "| 20 | 4.200 |" in out and (tmp_path / "training_metrics.csv").exists()
    show_training_curve(tmp_path / "absent.jsonl", tmp_path / "none.csv")  # no file logger: nothing to show
    assert not (tmp_path / "none.csv").exists()
    # an earlier run's file (written before this run started) is not this run's curve
    show_training_curve(tmp_path / "metrics.jsonl", tmp_path / "stale.csv", since=time.time() + 60)
    assert not (tmp_path / "stale.csv").exists()


def test_spd_train_adds_the_file_logger_and_keeps_the_others(tmp_path, monkeypatch):
    import subprocess

    from spd_verl import train

    cfg = train.compose("spd_demo", [])
    assert list(cfg.trainer.logger) == ["console"]  # the plain verl command writes no metrics file
    assert train.with_file_logger(cfg, ["a=1"]) == ["a=1", "trainer.logger=[console,file]"]
    user = ["trainer.logger=[console,tensorboard]"]
    assert train.with_file_logger(train.compose("spd_demo", user), user) == ["trainer.logger=[console,tensorboard,file]"]
    user = ["trainer.logger=[file]"]
    assert train.with_file_logger(train.compose("spd_demo", user), user) == user

    calls = []
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 1)  # main_ppo "fails"
    out = tmp_path / "not" / "yet"
    assert train.main(["--out", str(out), "trainer.total_training_steps=3"]) == 1
    cmd, env = calls[0]
    assert cmd[-2:] == ["trainer.total_training_steps=3", "trainer.logger=[console,file]"]
    # verl's file logger opens this path without making its directory: spd-train makes it
    assert env["VERL_FILE_LOGGER_PATH"] == str(out.resolve() / "metrics.jsonl") and out.is_dir()
