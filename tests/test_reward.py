import pytest

from spd_verl.reward import RewardConfig, answers_match, compute_spd_reward, extract_answer, is_correct


@pytest.mark.parametrize("text,expected", [
    ("Tom has 3 .\n#### 12", "12"),
    ("#### 4 7", "47"),                       # spaced digits read as one number
    ("first #### 3 then\n#### 5", "5"),       # the last final line wins
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{x} and later \\boxed{7}", "7"),
    ("no final answer here 12", None),
    ("####   ", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("answer,gt,ok", [
    ("12", "12", True), ("12.0", "12", True), ("1,200", "1200", True), ("\\frac{1}{2}", "0.5", True),
    ("-3", "-3", True), ("13", "12", False), (None, "12", False), ("abc", "abc", True), ("$5", "5", True),
])
def test_answers_match(answer, gt, ok):
    assert answers_match(answer, gt) is ok


def test_gated_reward_terms():
    r = compute_spd_reward("#### 12", "12", mismatches=4, accepted_mismatches=2, target_forwards=10,
                           response_length=30, hit_length_cap=False, cfg=RewardConfig(alpha=0.5))
    assert r["score"] == pytest.approx(1.25) and r["correct"] == 1.0 and r["acceptance_bonus"] == 0.25
    assert r["tau"] == 3.0 and r["overlong_penalty"] == 0.0
    wrong = compute_spd_reward("#### 13", "12", mismatches=4, accepted_mismatches=4, target_forwards=10,
                               response_length=30, hit_length_cap=False)
    assert wrong["score"] == 0.0  # a wrong answer never earns the bonus
    capped = compute_spd_reward("1 2 3", "12", mismatches=0, accepted_mismatches=0, target_forwards=5,
                                response_length=20, hit_length_cap=True, cfg=RewardConfig(overlong_penalty=0.3))
    assert capped["score"] == pytest.approx(-0.3) and capped["overlong"] == 1.0


def test_other_reward_kinds():
    kw = dict(mismatches=4, accepted_mismatches=4, target_forwards=10, response_length=30, hit_length_cap=False)
    assert compute_spd_reward("#### 12", "12", cfg=RewardConfig(kind="correct_only"), **kw)["score"] == 1.0
    tb = compute_spd_reward("#### 12", "12", gamma=4, cfg=RewardConfig(kind="tau_bonus", alpha=1.0), **kw)
    assert tb["score"] == pytest.approx(1.0 + (3.0 - 1.0) / 4)
    with pytest.raises(ValueError, match="needs gamma"):
        compute_spd_reward("#### 12", "12", cfg=RewardConfig(kind="tau_bonus"), **kw)
    # gated_run: 12 of the 30 tokens were kept by the 4 accepts
    gr = compute_spd_reward("#### 12", "12", cfg=RewardConfig(kind="gated_run", alpha=0.5), accepted_run_tokens=12, **kw)
    assert gr["score"] == pytest.approx(1.0 + 0.5 * 12 / 30) and gr["accepted_run_tokens"] == 12.0
    assert compute_spd_reward("#### 13", "12", cfg=RewardConfig(kind="gated_run"), accepted_run_tokens=12,
                              **kw)["score"] == 0.0
    with pytest.raises(ValueError, match="'gated_run' needs accepted_run_tokens"):
        compute_spd_reward("#### 12", "12", cfg=RewardConfig(kind="gated_run"), **kw)
    for bad in (3, 31):  # fewer tokens than accepts, or more than the response
        with pytest.raises(ValueError, match=f"inconsistent accepted_run_tokens={bad}"):
            compute_spd_reward("#### 12", "12", cfg=RewardConfig(kind="gated_run"), accepted_run_tokens=bad, **kw)


def test_bad_reward_input():
    with pytest.raises(ValueError, match="reward kind must be one of"):
        RewardConfig(kind="bogus")
    with pytest.raises(ValueError, match="inconsistent decision counts"):
        compute_spd_reward("#### 1", "1", mismatches=1, accepted_mismatches=2, target_forwards=1,
                           response_length=1, hit_length_cap=False)
    assert is_correct("#### 4 7", 47)
