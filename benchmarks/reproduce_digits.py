"""Does the digits recipe reproduce the shipped model? Time ``examples/train_digits.py`` and compare its folder.

    python benchmarks/reproduce_digits.py                    # one run, timed, compared with the shipped folder
    python benchmarks/reproduce_digits.py --runs 2           # two runs: each against the shipped folder

Each run is ``python examples/train_digits.py --output_dir <work>/run-N`` exactly as the README gives it (its default
settings: one torch thread, seed 0), timed as a whole process, and compared with ``src/sphere_ar_hf/pretrained/digits``:
every weights file byte for byte (SHA-256), every JSON file by its content, except what cannot repeat (the training
record's ``date``, and the library versions that wrote the file, ``*_version``). The script prints the wall time of
each run, whether it matches, and every difference. Run it on a quiet machine for the time; the bytes do not depend
on the load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "src" / "sphere_ar_hf" / "pretrained" / "digits"


def _comparable(value: object) -> object:
    """A JSON value without what differs between any two runs: ``date`` of a training record, ``*_version``."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if not k.endswith("_version") and k != "date"}
    return value


def contents(folder: Path) -> dict[str, object]:
    """Every file below ``folder`` by relative path: JSON files as their comparable content, others as SHA-256."""
    out: dict[str, object] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            name = str(p.relative_to(folder))
            out[name] = _comparable(json.loads(p.read_text())) if p.suffix == ".json" else \
                hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="recipe runs, one after the other")
    p.add_argument("--work-dir", type=Path, default=None, help="where the runs write (default: a temporary folder)")
    p.add_argument("--recipe-args", nargs=argparse.REMAINDER, default=[],
                   help="extra flags for train_digits.py (a smaller run for testing; it will not match)")
    args = p.parse_args(argv)
    shipped = contents(SHIPPED)
    results = []
    with tempfile.TemporaryDirectory(prefix="reproduce-digits-") as tmp:
        work = args.work_dir or Path(tmp)
        for n in range(args.runs):
            out = work / f"run-{n}"
            cmd = [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--output_dir", str(out),
                   *args.recipe_args]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True,
                                  text=True)
            seconds = time.perf_counter() - t0
            if done.returncode:
                raise SystemExit(f"run {n} failed:\n{done.stderr[-3000:]}")
            got = contents(out)
            differ = sorted(k for k in shipped.keys() | got.keys() if shipped.get(k) != got.get(k))
            results.append({"run": n, "seconds": seconds, "identical": not differ, "differ": differ})
            verdict = ("the same as the shipped folder (weights byte for byte; configs but for the date and library "
                       "versions)" if not differ else f"differs in {', '.join(differ)}")
            print(f"run {n}: {seconds:.0f} s ({seconds / 60:.1f} min), {len(got)} files, {verdict}", flush=True)
    return results


if __name__ == "__main__":
    main()
