"""Part 3 of ``bench_gpu.py``, two requests at once (a demo whose queue serves more than one request at a time):
one pipeline captures its token loops as CUDA graphs while another samples eagerly beside it, in two threads.

CUDA's default capture mode fails a capture when another thread makes an unsafe call meanwhile (allocating device
memory, waiting for the device, pinning host memory); the fast sampler captures in ``thread_local`` mode, one
capture in the process at a time (``fast_sampling.CAPTURE_LOCK``). Each request's images are compared with the same
request's images alone; the line says whether the capturing call really ran inside the eager one.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from sphere_ar_hf import SphereARPipeline

__all__ = ["two_requests"]

LABELS = [4, 5, 6, 7, 8]  # a batch size the offload part does not use: the graph request captures anew
STEPS = {"eager": 100, "graph": 20}  # the eager call outlasts the other's capture


def two_requests(pipe: SphereARPipeline, sample: Callable[..., torch.Tensor],
                 set_path: Callable[[SphereARPipeline, str, str], None], backend: str, seed: int) -> str:
    """The result line: ``pipe`` copied twice, eager and graph-captured; the graph path's functions compiled first
    (without capture), then both requests at once, the graph one started 0.2 s after the eager one, then each alone:
    the largest difference of each from its images alone."""
    pipes = {path: copy.deepcopy(pipe) for path in STEPS}
    set_path(pipes["eager"], "eager", backend)
    set_path(pipes["graph"], "compiled", backend)
    sample(pipes["graph"], LABELS, STEPS["graph"], seed, guidance_scale=4.0)  # compiles: the capture below is quick
    set_path(pipes["graph"], "graph", backend)  # a new sampler, the same compiled functions
    windows: dict[str, tuple[float, float]] = {}
    started = threading.Event()

    def request(path: str) -> torch.Tensor:
        if path == "graph":
            started.wait()
            time.sleep(0.2)
        started.set()
        t0 = time.perf_counter()
        images = sample(pipes[path], LABELS, STEPS[path], seed, guidance_scale=4.0)
        windows[path] = (t0, time.perf_counter())
        return images

    with ThreadPoolExecutor(2) as pool:
        together = dict(zip(STEPS, pool.map(request, STEPS)))
    (e0, e1), (g0, g1) = windows["eager"], windows["graph"]
    diffs = {path: (together[path] - sample(p, LABELS, STEPS[path], seed, guidance_scale=4.0)).abs().max().item()
             for path, p in pipes.items()}
    return (f"two requests at once (the graph path capturing at batch {len(LABELS)} "
            f"{'inside' if e0 <= g0 and g1 <= e1 else 'NOT inside'} an eager call, {g1 - g0:.2f} s in {e1 - e0:.2f} "
            f"s): max |diff| from alone: eager {diffs['eager']:.2e}, graph {diffs['graph']:.2e}")
