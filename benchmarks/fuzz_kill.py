"""benchmarks/fuzz_robustness.py's kill -9 cases: a writer (convert, push --dry-run, space, sample's merge) killed
with SIGKILL at a chosen moment, then the same command run again: the user's folder must be whole, with no
leftovers."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from fuzz_cases import ROOT, Case

KILLER = """
import os, signal, sys
from pathlib import Path
from sphere_ar_hf import utils
from sphere_ar_hf.cli import main
moment, argv = sys.argv[1], sys.argv[2:]
real_replace, real_stage = os.replace, utils.stage_folder
def replace(src, dst):
    if moment == "between-renames" and ".tmp-" in Path(src).name:
        os.kill(os.getpid(), signal.SIGKILL)
    if moment == "merge" and Path(dst).name == "samples.npz":  # the merged file written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
def stage(output, shared=False):
    staged = real_stage(output, shared)
    if moment == "while-staging":
        os.kill(os.getpid(), signal.SIGKILL)
    return staged
utils.os.replace, utils.stage_folder = replace, stage
sys.exit(main(argv))
"""


def kill_case(name: str, argv: list[str], out: Path, work: Path, moment: str) -> Case:
    def run() -> str:
        from sphere_ar_hf.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main([*argv, "--overwrite"] if out.exists() else argv)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, "-c", KILLER, moment, *argv, "--overwrite"], env=env, cwd=work,
                              capture_output=True, timeout=600)
        if proc.returncode != -signal.SIGKILL:
            return "traceback-type error"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main([*argv, "--overwrite"])  # the next run of the same command
        leftovers = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        return "works" if code == 0 and out.is_dir() and not leftovers else "files lost"

    return Case("kill -9", f"{name} ({moment})", run)


def kill_cases(model: Path, work: Path) -> Iterator[Case]:
    import sphere_ar_hf

    ar = ROOT.parent / "shared" / "fixtures" / "official-tiny" / "ar.pt"
    for moment in ("between-renames", "while-staging"):
        if ar.is_file():
            out = work / f"convert-{moment}"
            yield kill_case("convert", ["convert", "--checkpoint", str(ar), "--output", str(out)], out, work, moment)
        out = work / f"push-{moment}"
        yield kill_case("push --dry-run", ["push", "--pipeline", str(model), "--repo-id", "me/x", "--license", "mit",
                                           "--dry-run", str(out)], out, work, moment)
        out = work / f"space-{moment}"
        yield kill_case("space", ["space", "--output", str(out), "--license", "mit"], out, work, moment)
    assert sphere_ar_hf
    yield sample_kill_case(model, work)


def sample_kill_case(model: Path, work: Path) -> Case:
    """``sample`` killed while it writes ``samples.npz``; the same command with ``--resume`` then finishes it and
    removes the killed writer's temporary file."""
    def run() -> str:
        from sphere_ar_hf.cli import main

        out = work / "sample-merge"
        argv = ["sample", "--model", str(model), "--output-dir", str(out), "--steps", "1", "--num-images", "4"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, "-c", KILLER, "merge", *argv], env=env, cwd=work,
                              capture_output=True, timeout=600)
        if proc.returncode != -signal.SIGKILL or not [p for p in out.iterdir() if p.name.endswith(".tmp")]:
            return "traceback-type error"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main([*argv, "--resume"])
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        return "works" if code == 0 and (out / "samples.npz").is_file() and not leftovers else "files lost"

    return Case("kill -9", "sample (merge)", run)
