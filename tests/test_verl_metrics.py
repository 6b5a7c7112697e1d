"""SPD metrics are pooled over the batch (ratios of sums), from training extras and validation infos."""

import pytest

from spd_verl.verl_ext.metrics import rows_from_extra_fields, rows_from_reward_infos, spd_summary


def test_training_metrics_pool_over_sequences():
    extras = [
        {"spd_mismatches": 4, "spd_accepted_mismatches": 1, "spd_target_forwards": 5, "spd_truncated": True,
         "spd_batch_size": 2, "reward_extra_info": {"correct": 1.0}},
        {"spd_mismatches": 0, "spd_accepted_mismatches": 0, "spd_target_forwards": 3, "spd_truncated": False,
         "spd_batch_size": 2, "reward_extra_info": {"correct": 0.0}},
    ]
    m = spd_summary(rows_from_extra_fields(extras, [15, 9]), "spd")
    assert m["spd/tau"] == pytest.approx(24 / 8)
    assert m["spd/target_forwards_per_token"] == pytest.approx(8 / 24)
    assert m["spd/accepted_mismatch_rate"] == pytest.approx(1 / 4)
    assert (m["spd/mismatches_per_seq"], m["spd/response_length"], m["spd/accuracy"]) == (2.0, 12.0, 0.5)
    assert (m["spd/truncated_rate"], m["spd/sequences_without_decision"], m["spd/server_batch_size"]) == (0.5, 0.5, 2)
    assert "spd/forced_reject_rate" not in m  # no gate in this batch's rollouts
    extras[0]["spd_forced_rejects"], extras[1]["spd_forced_rejects"] = 3, 0
    gated = spd_summary(rows_from_extra_fields(extras, [15, 9]), "spd")
    assert gated["spd/forced_reject_rate"] == pytest.approx(3 / 4)
    assert "spd/tokens_per_accept" not in gated
    extras[0]["spd_accepted_run_tokens"], extras[1]["spd_accepted_run_tokens"] = 5, 0
    assert spd_summary(rows_from_extra_fields(extras, [15, 9]), "spd")["spd/tokens_per_accept"] == 5.0


def test_validation_metrics_from_reward_terms():
    infos = {"mismatches": [2.0, 2.0], "accepted_mismatches": [2.0, 0.0], "tau": [4.0, 2.0],
             "response_length": [8.0, 8.0], "correct": [1.0, 1.0], "overlong": [0.0, 1.0]}
    m = spd_summary(rows_from_reward_infos(infos), "val-spd")
    assert m["val-spd/tau"] == pytest.approx(16 / 6) and m["val-spd/accepted_mismatch_rate"] == 0.5
    assert m["val-spd/accuracy"] == 1.0 and m["val-spd/truncated_rate"] == 0.5
    assert "val-spd/tokens_per_accept" not in m
    m = spd_summary(rows_from_reward_infos({**infos, "accepted_run_tokens": [6.0, 0.0]}), "val-spd")
    assert m["val-spd/tokens_per_accept"] == 3.0
    assert spd_summary(rows_from_reward_infos({"correct": [1.0]}), "val-spd") == {}
