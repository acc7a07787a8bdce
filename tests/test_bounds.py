"""Memory and disk bounds checked before the work starts, each a one-line error that says what fits: an upscaling
too large to hold (`generate --scale 100000`), a run of a trillion images or of ten million one-image shards
(`sample`), a run whose shards and `samples.npz` do not fit on the disk, and the digits feature space on large
images (`evaluate --features digits`)."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from sphere_ar_hf.evaluation import sampling
from test_cli import error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tiny_pipeline_dir) -> Path:
    return tiny_pipeline_dir


def refused(*argv, needles: tuple[str, ...]) -> None:
    code, stdout, err = run(*map(str, argv))
    line = error_line(err)
    assert code == 2 and all(n in line for n in needles), line


@pytest.mark.parametrize(("scale", "labels", "needles"), [
    ("100000", ["1"], ("--scale 100000", "3200000 pixels per side", "at most 8192", "--scale 256 or less")),
    ("200", ["1"] * 64, ("64 images of 6400x6400 pixels", "at most 268")),
])
def test_generate_refuses_an_upscaling_that_does_not_fit(model, tmp_path, scale, labels, needles) -> None:
    refused("generate", "--model", model, "--class-labels", *labels, "--steps", "1", "--scale", scale,
            "--output", tmp_path / "out.png", needles=needles)
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(("extra", "needles"), [
    (["--num-images", str(10**12)], ("1000000000 shard files; at most 1000000", "shard size of 1000000")),
    (["--num-images", str(10**7), "--shard-size", "1"], ("10000000 shard files", "shard size of 10 or more")),
])
def test_sample_refuses_too_many_shards_before_writing(model, tmp_path, extra, needles) -> None:
    out = tmp_path / "run"
    refused("sample", "--model", model, "--output-dir", out, "--steps", "1", *extra, needles=needles)
    assert not out.exists()


def test_sample_refuses_a_run_that_does_not_fit_on_the_disk(model, tmp_path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))  # 1 MB free
    out = tmp_path / "run"
    # 200 images of 32x32: 1.2 MB of shards and samples.npz
    refused("sample", "--model", model, "--output-dir", out, "--steps", "1", "--num-images", "200",
            needles=("200 images of 32x32 need about 1.2 MiB of disk", "1.0 MiB is free"))
    assert not out.exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    code, _, err = run("sample", "--model", str(model), "--output-dir", str(out), "--steps", "1", "--num-images", "4")
    assert code == 0, err
    assert sampling.MAX_SHARDS == 1_000_000


def test_evaluate_digits_refuses_large_images(tmp_path) -> None:
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((5, 512, 512, 3), np.uint8))
    refused("evaluate", tmp_path / "big.npz", "--features", "digits",
            needles=("512x512 images", "at most 64 px"))
