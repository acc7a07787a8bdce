"""``sphere-ar sweep``: a setting's runs are exactly ``sample`` + ``evaluate``'s, a killed sweep resumes without
redoing finished work, bad flags are one-line errors, and the outputs (json, table, png) are written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sphere_ar_hf.cli import main as cli
from sphere_ar_hf.evaluation import sweep as sweep_module

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--num-images", "16", "--labels", "balanced", "--threads", "1", "--shard-size", "8"]
SWEEP = ["sweep", *COMMON, "--steps", "6", "--features", "digits"]


def _sweep(out: Path, *extra: str) -> int:
    return cli([*SWEEP, "--output-dir", str(out), *extra])


def test_one_setting_equals_sample_then_evaluate(tmp_path, capsys) -> None:
    sampled = tmp_path / "sampled"
    assert cli(["sample", *COMMON, "--steps", "10", "--guidance-scale", "3", "--cfg-schedule", "constant",
                "--seed", "7", "--output-dir", str(sampled)]) == 0
    capsys.readouterr()
    assert cli(["evaluate", str(sampled / "samples.npz"), "--features", "digits", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    out = tmp_path / "sweep"
    assert cli(["sweep", *COMMON, "--steps", "10", "--guidance-scales", "3", "--cfg-schedule", "constant",
                "--seed", "7", "--features", "digits", "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    run = out / "guidance-3_steps-10_euler_maruyama_constant_seed-7"
    assert (run / "samples.npz").read_bytes() == (sampled / "samples.npz").read_bytes()
    assert json.loads((run / "sampling.json").read_text()) == json.loads((sampled / "sampling.json").read_text())
    summary = json.loads((out / "sweep.json").read_text())
    (result,) = summary["results"]
    assert result["metrics"]["fd"]["mean"] == evaluated["frechet_distance"]
    assert result["metrics"]["recall"]["mean"] == evaluated["recall"]
    assert result["metrics"]["fd"]["std"] is None and result["best"]
    assert f"best by FD: {result['name']}: {evaluated['frechet_distance']:.4g}" in stdout


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_interrupted_sweep_resumes_without_redoing_finished_runs(tmp_path, capsys, monkeypatch) -> None:
    flags = ["--guidance-scales", "1", "2.5", "--seeds", "2"]
    whole = tmp_path / "whole"
    assert _sweep(whole, *flags) == 0
    capsys.readouterr()

    killed = tmp_path / "killed"
    evaluate_run, calls = sweep_module.evaluate_run, []

    def crash_on_the_third(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate_run(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_run", crash_on_the_third)
    assert _sweep(killed, *flags) == 130  # interrupted during the third run's evaluation
    monkeypatch.setattr(sweep_module, "evaluate_run", evaluate_run)
    runs = sorted(p for p in killed.iterdir() if p.is_dir())
    assert [p.name for p in runs] == sorted(calls) and len(runs) == 3
    finished = [p for p in runs if (p / "metrics.json").is_file()]
    assert len(finished) == 2 and not (killed / "sweep.json").exists()
    unevaluated = next(p for p in runs if p not in finished)
    shards = sorted((unevaluated / "shards").glob("*.npz"))
    shards[1].unlink()  # as if killed while sampling it: only this shard is sampled again
    before = {p.name: _mtimes(p) for p in finished}
    kept_shard = shards[0].stat().st_mtime_ns
    capsys.readouterr()

    assert _sweep(killed, *flags) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert _sweep(killed, *flags, "--resume") == 0
    captured = capsys.readouterr()
    assert "resuming: 2 of 4 runs already evaluated" in captured.err
    assert {p.name: _mtimes(p) for p in finished} == before  # neither resampled nor re-evaluated
    assert shards[0].stat().st_mtime_ns == kept_shard and shards[1].is_file()
    assert (whole / "sweep.json").read_text() == (killed / "sweep.json").read_text()
    for run in runs:
        assert (run / "samples.npz").read_bytes() == (whole / run.name / "samples.npz").read_bytes()


def test_outputs_and_seed_spread(tmp_path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "sweep"
    assert _sweep(out, "--guidance-scales", "1", "3", "--cfg-schedule", "linear", "constant", "--seeds", "2",
                  "--seed", "4") == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    names = [r["name"] for r in summary["results"]]
    assert len(names) == len(set(names)) == 4 and summary["seeds"] == [4, 5]
    fds = {}
    for r in summary["results"]:
        values = [json.loads((out / f / "metrics.json").read_text())["frechet_distance"] for f in r["folders"]]
        fd = r["metrics"]["fd"]
        assert fd["values"] == values and fd["mean"] == pytest.approx(np.mean(values))
        assert fd["std"] == pytest.approx(np.std(values, ddof=1)) and fd["se"] == pytest.approx(fd["std"] / 2**0.5)
        assert {"precision", "recall", "accuracy"} <= set(r["metrics"]) and "inception_score" not in r["metrics"]
        assert isinstance(r["within_noise"], bool)
        fds[r["name"]] = fd["mean"]
    best = min(fds, key=fds.get)
    assert summary["best"] == best and f"best by FD: {best}" in stdout
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 1 + 1 + 4 and "**best**" in table and table.splitlines()[2] in stdout
    with Image.open(out / "sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 400 and image.size[1] > 200
        image.verify()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_bad_flags_are_one_line_errors(tmp_path, capsys) -> None:
    out = tmp_path / "bad"
    cases = [
        (["--guidance-scales", "-1"], "guidance_scales: -1.0; expected finite scales >= 0"),
        (["--guidance-scales", "inf"], "expected a finite number"),
        (["--guidance-scales"], "expected at least one argument"),
        (["--guidance-scales", "2", "2"], "guidance_scales: 2.0 given twice"),
        (["--guidance-scales", "0.5", "1"], "0.5, 1 all disable guidance"),
        (["--guidance-scales", "2", "--steps", "0"], "expected a positive integer, got 0"),
        (["--guidance-scales", "2", "--steps", "5", "5"], "steps: 5 given twice"),
        (["--guidance-scales", "2", "--sampler", "ddim"], "invalid choice: 'ddim'"),
        (["--guidance-scales", "2", "--cfg-schedule", "cosine"], "invalid choice: 'cosine'"),
        (["--guidance-scales", "2", "--num-images", "1"], "num_images: 1; expected >= 2"),
        (["--guidance-scales", "2", "--features", "inception"], "reference: none given"),
        (["--guidance-scales", "2", "--reference", str(tmp_path / "nowhere.npz")], "nowhere.npz: no such file"),
        (["--guidance-scales", "2", "--time-shift", "0"], "time_shift"),
    ]
    for extra, needle in cases:
        code = _sweep(out, *extra)
        err = capsys.readouterr().err
        assert code == 2 and needle in err.strip().splitlines()[-1] and err.count("error:") == 1, (extra, err)
    assert not any(p.is_dir() for p in out.glob("*/")), "a refused sweep sampled nothing"
    assert _sweep(out, "--guidance-scales", "2") == 0
    capsys.readouterr()
    for extra, needle in ((["--num-images", "10"], "num_images: 16 there, 10 now"),
                          (["--guidance-scales", "2", "3"], "guidance_scales: [2.0] there, [2.0, 3.0] now"),
                          (["--features", "inception", "--reference", str(out / "sweep.json")], "features:")):
        code = _sweep(out, "--guidance-scales", "2", *extra, "--resume") if "--guidance-scales" not in extra \
            else _sweep(out, *extra, "--resume")
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and needle in err, err
