"""The demo world: generator, tokenizer, parquet format, committed assets, reference rules."""

from __future__ import annotations

import re

import pytest
import torch

from spd_verl.world import WORLD_DIR, load_world
from spd_verl.world import problems as P
from spd_verl.world.build import N_CALIB, read_split, to_rows, write_parquet
from spd_verl.world.tokenizer import (BOS_ID, EOS_ID, UNK_ID, build_tokenizer, encode_text,
                                      prompt_ids, prompt_text)

EQ = re.compile(r"((?:\d )*\d) ([+-]) ((?:\d )*\d) = ((?:\d )*\d) \.")


def _num(s: str) -> int:
    return int(s.replace(" ", ""))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def sample():
    return P.generate(3000, seed=11)


def test_generator_is_deterministic():
    a, b = P.generate(200, seed=5), P.generate(200, seed=5)
    assert [(p.question, p.solution) for p in a] == [(p.question, p.solution) for p in b]
    c = P.generate(200, seed=6)
    assert [p.question for p in a] != [p.question for p in c]


def test_answers_correct_by_construction(sample):
    for p in sample:
        assert P.check_solution(p), p.solution
        assert 2 <= len(p.steps) <= 3
        assert all(0 < b < 50 for b in p.operands)
        # Re-read the arithmetic from the solution text itself.
        eqs = EQ.findall(p.solution)
        assert len(eqs) == len(p.steps), p.solution
        for x, op, b, r in eqs:
            x, b, r = _num(x), _num(b), _num(r)
            assert r == (x + b if op == "+" else x - b), p.solution
            assert r >= 0 and x >= 0
        assert _num(eqs[-1][3]) == p.answer
        assert P.ANSWER_RE.findall(p.solution)[-1] == str(p.answer)
        assert p.solution.endswith(f"#### {p.answer}")


def test_style_freedom_is_skewed(sample):
    # canonical wording dominates, rarer variants still occur
    firsts = [p.solution.split(" . ")[1].split()[0] for p in sample]
    share = firsts.count("First") / len(firsts)
    assert 0.6 < share < 0.9
    assert "To" in firsts
    commuted = sum(1 for p in sample for (x, op, b, r) in p.steps
                   if op == "+" and b > x and f"{P.digits(b)} + {P.digits(x)} =" in p.solution)
    assert commuted > 0


def test_draft_house_style_same_problems_other_odds(sample, tok):
    """The draft's data: same questions and answers, correct arithmetic, same vocabulary, but
    the other style's favourite choices (the world's harmless mismatches)."""
    drafted = P.restyle(sample, P.DRAFT_STYLE, seed=3)
    assert P.restyle(sample[:50], P.DRAFT_STYLE, seed=3) == drafted[:50]  # deterministic
    assert [(p.question, p.answer) for p in drafted] == [(p.question, p.answer) for p in sample]
    assert all(P.check_solution(p) for p in drafted)
    vocab = tok.get_vocab()
    assert all(w in vocab for p in drafted[:300] for w in p.solution.split())

    def share_first(ps, word):
        return sum(p.solution.split(" . ")[1].split()[0] == word for p in ps) / len(ps)

    assert share_first(sample, "First") > 0.6 and share_first(drafted, "First") < 0.3
    assert share_first(drafted, "To") > 0.6

    def larger_first(ps):
        adds = [(p, x, b) for p in ps for (x, op, b, r) in p.steps if op == "+" and b > x]
        return sum(f"{P.digits(b)} + {P.digits(x)} =" in p.solution for p, x, b in adds) / len(adds)

    assert larger_first(sample) > 0.7 and larger_first(drafted) < 0.3


def test_restyle_share(sample):
    part = P.restyle(sample, P.DRAFT_STYLE, seed=4, share=0.1)
    changed = sum(a.solution != b.solution for a, b in zip(part, sample)) / len(sample)
    assert 0.05 < changed < 0.12  # a few restyled solutions come out identical by chance
    assert P.restyle(sample, P.DRAFT_STYLE, seed=4, share=0.0) == sample
    with pytest.raises(ValueError, match="share must be in"):
        P.restyle(sample, P.DRAFT_STYLE, seed=4, share=1.5)


def test_tokenizer_round_trip(tok, sample):
    vocab = tok.get_vocab()
    assert [vocab[s] for s in ("<pad>", "<s>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.eos_token_id == EOS_ID and tok.bos_token_id == BOS_ID
    for p in sample[:500]:
        for text in (p.question, p.solution):
            ids = encode_text(tok, text)
            assert UNK_ID not in ids
            assert tok.decode(ids) == text
        decoded = tok.decode(encode_text(tok, p.solution) + [EOS_ID], skip_special_tokens=True)
        assert P.ANSWER_RE.findall(decoded)[-1] == str(p.answer)
    try:
        from spd_verl.reward import extract_answer, is_correct
    except ImportError:
        return
    dec = tok.decode(encode_text(tok, sample[0].solution) + [EOS_ID], skip_special_tokens=True)
    assert float(extract_answer(dec)) == sample[0].answer
    assert is_correct(dec, str(sample[0].answer))


def test_vocabulary_is_deterministic_and_complete(tok, sample):
    assert build_tokenizer().get_vocab() == tok.get_vocab()
    words = set(P.vocabulary())
    assert all(w in words for p in sample for w in (p.question + " " + p.solution).split())


def test_chat_template_prompt_ids(tok, sample):
    q = sample[0].question
    ids = prompt_ids(tok, q)
    assert ids[0] == BOS_ID
    assert ids == tok(prompt_text(q), add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["A", ":"]
    assert tok.decode(ids[1:]) == f"Q : {q} A :"


def test_parquet_rows_in_verl_format(tmp_path, sample):
    rows = to_rows(sample[:20], "test")
    write_parquet(rows, tmp_path / "t.parquet")
    import pandas as pd

    df = pd.read_parquet(tmp_path / "t.parquet")
    assert set(df.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    r = df.iloc[3]
    assert r["data_source"] == "spd_arith" and r["ability"] == "math"
    assert list(r["prompt"])[0]["role"] == "user"
    assert list(r["prompt"])[0]["content"] == sample[3].question
    assert r["reward_model"]["style"] == "rule"
    assert r["reward_model"]["ground_truth"] == str(sample[3].answer)
    assert r["extra_info"]["split"] == "test" and r["extra_info"]["index"] == 3
    texts, gts = read_split(tmp_path / "t.parquet")
    assert texts[3] == sample[3].question and gts[3] == str(sample[3].answer)


def test_tiny_training_reduces_loss(tok, sample):
    from spd_verl.world.train import ModelSpec, _batch, encode_examples, train_model

    ex = encode_examples(tok, sample[:64])
    spec = ModelSpec(layers=1, hidden=32, heads=2, steps=25, batch_size=16, lr=1e-2, warmup=5)
    torch.manual_seed(0)
    ids, mask, labels = _batch(ex, list(range(16)))
    fresh = train_model(ModelSpec(1, 32, 2, steps=0), len(tok), ex, seed=0, log=None, threads=1)
    trained = train_model(spec, len(tok), ex, seed=0, log=None, threads=1)
    with torch.no_grad():
        before = fresh(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        after = trained(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert after < before - 1.0


# --- the committed world -------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    return load_world()


def test_committed_world_loads(world):
    assert world.path == WORLD_DIR
    assert world.draft.config.vocab_size == world.target.config.vocab_size == len(world.tokenizer)
    assert world.eos_token_id == EOS_ID
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(world.draft) < n(world.target)
    assert not world.target.training and not world.draft.training
    questions = {}
    for split in ("train", "val", "test", "calib"):
        texts, gts = read_split(world.data_dir / f"{split}.parquet")
        assert texts and len(texts) == len(gts)
        questions[split] = set(texts)
    assert len(questions["calib"]) == N_CALIB
    for a, b in [("calib", "train"), ("calib", "val"), ("calib", "test"), ("val", "test"), ("val", "train"),
                 ("test", "train")]:
        assert not questions[a] & questions[b], f"{a} and {b} share questions"
    assert (WORLD_DIR / "card.json").exists()
    # the saved tokenizer is the one the code builds
    assert world.tokenizer.get_vocab() == build_tokenizer().get_vocab()


def test_calib_split_is_what_spd_world_writes():
    """The committed calib split is split_problems' (drawn after train, so it avoids every problem the
    models were trained on, not only the committed prefix)."""
    from spd_verl.world.build import HOUSE_STYLES, N_CALIB, TARGET, split_problems, training_draw_size
    from spd_verl.world.train import ModelSpec

    spec = ModelSpec(**{**TARGET, "steps": HOUSE_STYLES["target_steps"]})
    train, _, _, calib = split_problems(0, training_draw_size(spec))
    assert len(calib) == N_CALIB and not {p.question for p in calib} & {p.question for p in train}
    texts, gts = read_split(WORLD_DIR / "data" / "calib.parquet")
    assert texts == [p.question for p in calib] and gts == [str(p.answer) for p in calib]


def test_committed_target_solves_problems(world):
    from spd_verl.world.oracle import is_correct
    from spd_verl.world.train import greedy_generate

    texts, gts = read_split(world.data_dir / "test.parquet")
    prompts = [prompt_ids(world.tokenizer, t) for t in texts[:16]]
    resp = greedy_generate(world.target, prompts, max_new_tokens=128)
    ok = sum(is_correct(world.tokenizer.decode(r, skip_special_tokens=True), g)
             for r, g in zip(resp, gts[:16]))
    assert ok >= 13


def test_reference_rules(world):
    from spd_verl.spd import DecisionContext
    from spd_verl.world.oracle import NonDigitRule, SingleSwapOracle
    from spd_verl.world.train import greedy_generate

    tk = world.tokenizer
    v = tk.get_vocab()
    texts, gts = read_split(world.data_dir / "test.parquet")
    prompt = prompt_ids(tk, texts[0])
    resp = greedy_generate(world.target, [prompt], max_new_tokens=128)[0]
    assert resp[-1] == EOS_ID
    toks = tk.convert_ids_to_tokens(resp)
    a = toks.index("####") + 1  # the answer token
    wrong = str((int(toks[a]) + 1) % 100)
    # decisions: identity swap at position 0 (harmless); wrong answer token (harmful)
    ctx = DecisionContext(
        rows=torch.tensor([0, 0]), positions=torch.tensor([0, a]),
        draft_tokens=torch.tensor([resp[0], v[wrong]]), target_tokens=torch.tensor([resp[0], resp[a]]),
        logits=None, features=torch.zeros(2, 4),
        prefixes=[prompt, prompt + resp[:a]])
    oracle = SingleSwapOracle(world.target, tk, [gts[0]], 128, EOS_ID)
    assert oracle.harmless(ctx.prefixes, ctx.draft_tokens.tolist(), [0, a], [0, 0]) == [True, False]
    # separate rows so the walk logic does not skip the second one
    ctx.rows = torch.tensor([0, 1])
    oracle = SingleSwapOracle(world.target, tk, [gts[0], gts[0]], 128, EOS_ID)
    assert oracle.decide(ctx).tolist() == [True, False]
    rule = NonDigitRule(tk)
    ctx2 = DecisionContext(
        rows=torch.tensor([0, 0, 0]), positions=torch.tensor([0, 1, 2]),
        draft_tokens=torch.tensor([v["buys"], v["7"], v["Then"]]),
        target_tokens=torch.tensor([v["sells"], v["gains"], v["47"]]),
        logits=None, features=torch.zeros(3, 4))
    assert rule.decide(ctx2).tolist() == [True, False, False]
