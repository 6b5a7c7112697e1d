"""Decoding in forked workers (spd_verl.eval.parallel): the same results as one process, errors that
name the worker, and the settings that switch it on."""

import pytest
import torch

from spd_verl.eval.parallel import check_cpu, check_workers, fork_map, shards


def square(i):
    return {"i": i, "sq": i * i, "threads": torch.get_num_threads()}


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_fork_map_equals_a_plain_map_in_order(workers, n):
    before = torch.get_num_threads()
    out = fork_map(square, n, workers)
    assert [(r["i"], r["sq"]) for r in out] == [(i, i * i) for i in range(n)]
    assert torch.get_num_threads() == before  # the parent's threads are given back
    if min(workers, n) > 1:  # each process ran with its share of the threads
        assert {r["threads"] for r in out} == {max(1, before // min(workers, n))}


def test_shards_are_contiguous_and_cover_every_index():
    assert shards(5, 2) == [range(0, 2), range(2, 5)]
    assert shards(2, 3) == [range(0, 1), range(1, 2)]
    assert shards(0, 2) == [range(0, 0)]
    assert [i for part in shards(17, 3) for i in part] == list(range(17))


def test_a_failing_worker_is_raised_with_its_traceback():
    def fails_late(i):
        if i == 3:
            raise ValueError("no answer for problem 3")
        return i

    with pytest.raises(RuntimeError, match=r"decoding worker 1 of 2 failed on indices 2-3:(.|\n)*"
                                           r"ValueError: no answer for problem 3"):
        fork_map(fails_late, 4, 2)
    with pytest.raises(ValueError, match="no answer for problem 3"):  # in this process: the error itself
        fork_map(fails_late, 4, 1)


def test_a_worker_that_dies_is_reported():
    import os

    def dies(i):
        if i == 1:
            os._exit(3)
        return i

    with pytest.raises(RuntimeError, match=r"decoding worker 1 of 2 exited \(code 3\) without a result"):
        fork_map(dies, 2, 2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_bad_worker_counts_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="spd.eval.workers must be an integer >= 1"):
        check_workers(bad, "spd.eval.workers")


def test_workers_refuse_models_off_the_cpu():
    off = torch.nn.Linear(2, 2, device="meta")
    check_cpu([off], 1)  # one process: anywhere
    with pytest.raises(ValueError, match=r"workers=2 forks CPU decoding processes, but the models are on \['meta'\]"):
        check_cpu([torch.nn.Linear(2, 2), off, None], 2)


def test_eval_workers_setting():
    from omegaconf import OmegaConf

    from spd_verl.train import eval_workers

    assert eval_workers(OmegaConf.create(dict(spd=dict(eval=dict())))) == 1
    assert eval_workers(OmegaConf.create(dict(spd=dict(eval=dict(workers=2))))) == 2
    with pytest.raises(ValueError, match="spd.eval.workers must be an integer >= 1"):
        eval_workers(OmegaConf.create(dict(spd=dict(eval=dict(workers=0)))))
