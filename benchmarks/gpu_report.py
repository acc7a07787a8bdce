"""How ``bench_gpu.py`` reports: lines stamped with the seconds since the start, and parts that fail without
ending the run.

A device is lent for minutes: one run must show every part it reaches. A part that raises (a CUDA error, a
capture that fails, out of memory) prints ``FAILED <part>: <error>`` (its traceback on stderr), and the run goes on
with the next part; the closing line names every failed part and the script exits with status 1.
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Iterator

import torch

__all__ = ["FAILURES", "attempt", "finish", "log", "sync"]

START = time.perf_counter()
FAILURES: list[str] = []  # "<part>: <error>", in order


def log(message: str) -> None:
    """One result line, stamped with the seconds since the start (a run cut off still shows how far it got)."""
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def sync(device: torch.device) -> None:
    """Waits for ``device`` (CUDA) to finish its queued work; nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def attempt(part: str) -> Iterator[None]:
    """Runs one part of the benchmark: an exception becomes a ``FAILED`` line and the run goes on. Memory is
    released afterwards either way (what the part held, CUDA's cached blocks)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - a failed part is a result; the next part still runs
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # the first line, and the second where the first only announces it ("backend='inductor' raised:")
        message = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])[:300]
        FAILURES.append(f"{part}: {type(e).__name__}: {message}")
        log(f"FAILED {FAILURES[-1]}")
        traceback.print_exc()
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def finish() -> None:
    """The closing line: ``done``, or the failed parts and exit status 1."""
    if FAILURES:
        log(f"done; {len(FAILURES)} part(s) failed: {' | '.join(FAILURES)}")
        raise SystemExit(1)
    log("done")
