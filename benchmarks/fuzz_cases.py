"""The cases of benchmarks/fuzz_robustness.py: what a case is, its outcomes, and how an exception is judged. Importing
it puts the repository's ``src`` on the path and keeps the Hub offline."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OUTCOMES = ("works", "clean error", "one line, not naming it", "traceback-type error", "silent wrong result",
            "memory blow-up", "files lost")
CLEAN_TYPES = (ValueError, TypeError, OSError)
BLOW_UP_KIB = 2 * 2**20  # 2 GiB of peak RSS growth


@dataclass
class Case:
    group: str  # "folder mutations", "CLI / scripts", "Python API", "kill -9"
    name: str
    run: Callable[[], str]  # returns an outcome


def classify_exception(e: BaseException, needle: str | tuple[str, ...], clean: tuple[type, ...] = CLEAN_TYPES) -> str:
    text = str(e)
    if not isinstance(e, clean) or "\n" in text.strip() or not text.strip():
        return "traceback-type error"
    needles = (needle,) if isinstance(needle, str) else needle
    return "clean error" if any(n.lower() in text.lower() for n in needles) else "one line, not naming it"


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_case(case: Case) -> str:
    before = peak_kib()
    try:
        outcome = case.run()
    except MemoryError:
        outcome = "memory blow-up"
    return "memory blow-up" if peak_kib() - before > BLOW_UP_KIB else outcome
