"""Decoding on several CPU processes: the evaluation's independent batches, split across forked workers.

Why processes, not torch's threads: the demo world's models are tiny (hidden 64-128), so a decode is
many small matmuls, and torch's second intra-op thread buys little for them. Two forked processes
with one thread each decode the 1,600 calib problems ~1.3x faster than one process with two
threads, with identical tokens (README: Engine speed, ``benchmarks/bench_eval_workers.py``).
Forking shares the loaded models copy-on-write, so a worker costs no reload and no pickling of
the models; only each worker's results come back through a pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from typing import Callable

import torch


def check_workers(workers, name: str = "workers") -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{name} must be an integer >= 1 (decoding processes; 1 = this one alone), got {workers!r}")
    return workers


def check_cpu(models, workers: int) -> None:
    """Forked workers decode on the CPU only: a CUDA context does not survive a fork."""
    if workers == 1:
        return
    devices = sorted({str(p.device) for m in models if m is not None for p in m.parameters()} - {"cpu"})
    if devices:
        raise ValueError(f"workers={workers} forks CPU decoding processes, but the models are on {devices}: "
                         f"use workers=1 on an accelerator")


def shards(n: int, workers: int) -> list[range]:
    """``range(n)`` split into ``min(workers, n)`` contiguous, near-equal parts."""
    k = max(1, min(workers, n))
    return [range(n * w // k, n * (w + 1) // k) for w in range(k)]


def batch_slices(n: int, batch_size: int, workers: int = 1) -> list[slice]:
    """Consecutive batches of at most ``batch_size`` covering ``range(n)``, shrunk so that each of
    ``workers`` gets one (the engine's results do not depend on the batch: README, Engine speed)."""
    size = max(1, min(batch_size, -(-n // workers)))
    return [slice(i, i + size) for i in range(0, n, size)]


def fork_map(fn: Callable[[int], object], n: int, workers: int = 1) -> list:
    """``[fn(0), ..., fn(n - 1)]``, the indices split into ``workers`` contiguous shards: shard 0 runs
    here, the others in forked processes. torch's threads are divided among them for the duration
    (two jobs with two threads each on two cores ran ~20x slower: README, Engine speed).

    ``fn`` must be deterministic in its index for the result not to depend on ``workers``; its
    return values travel back pickled. A worker's exception is raised here as a RuntimeError with the
    worker's traceback."""
    check_workers(workers)
    parts = shards(n, workers)
    if len(parts) <= 1:
        return [fn(i) for i in range(n)]
    if "fork" not in mp.get_all_start_methods():
        raise RuntimeError(f"workers={workers} needs the 'fork' start method, which this platform lacks: use workers=1")
    threads = torch.get_num_threads()
    per = max(1, threads // len(parts))
    ctx = mp.get_context("fork")
    procs = []
    try:
        for w, part in enumerate(parts[1:], start=1):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker, args=(fn, part, send, per), daemon=True, name=f"spd-decode-{w}")
            proc.start()
            send.close()
            procs.append((proc, recv))
        torch.set_num_threads(per)
        out = [fn(i) for i in parts[0]]
        for w, (proc, recv) in enumerate(procs, start=1):
            try:
                status, payload = recv.recv()
            except EOFError:
                proc.join()
                raise RuntimeError(f"decoding worker {w} of {len(parts)} exited (code {proc.exitcode}) without "
                                   f"a result for indices {parts[w].start}-{parts[w].stop - 1}") from None
            if status != "ok":
                raise RuntimeError(f"decoding worker {w} of {len(parts)} failed on indices "
                                   f"{parts[w].start}-{parts[w].stop - 1}:\n{payload}")
            out += payload
        return out
    finally:
        torch.set_num_threads(threads)
        for proc, recv in procs:
            recv.close()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _worker(fn, indices: range, send, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        result = ("ok", [fn(i) for i in indices])
    except BaseException:  # the parent re-raises it with this traceback
        result = ("error", traceback.format_exc())
    try:
        send.send(result)
    finally:
        send.close()
