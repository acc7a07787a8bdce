"""A fast subset of benchmarks/fuzz_robustness.py (every 10th case of each kind): every outcome is a clean error
or works; none is a traceback, a silent wrong result, a memory blow-up or a lost file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fuzz_subset_has_only_clean_outcomes(capsys) -> None:
    spec = importlib.util.spec_from_file_location("fuzz_robustness", ROOT / "benchmarks" / "fuzz_robustness.py")
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz  # (its dataclasses look their module up)
    spec.loader.exec_module(fuzz)
    table = fuzz.main(["--quick", "--show", "bad"])
    out = capsys.readouterr().out
    assert set(table) == {"folder mutations", "CLI / scripts", "Python API", "kill -9"}, table
    for group, counts in table.items():
        bad = {k: v for k, v in counts.items() if k not in ("works", "clean error")}
        assert not bad, (group, bad, out)
        assert counts["clean error"] > 0 or group == "kill -9", (group, counts)
    assert sum(table["folder mutations"].values()) >= 40 and sum(table["CLI / scripts"].values()) >= 40
    assert "| silent wrong result | 0 | 0 | 0 | 0 |" in out
