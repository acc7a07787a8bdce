"""``sphere-ar sample``: per-image seeds and labels, the same samples.npz for any number of processes and batch
size, atomic shards with kill -9 / --resume, and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import launch_env, torchrun_command
from sphere_ar_hf.cli import main as cli
from sphere_ar_hf.evaluation import ImageSet, image_labels, image_seeds

TIMEOUT = 600
SAMPLE = ["--num-images", "40", "--labels", "uniform", "--seed", "5", "--steps", "6", "--shard-size", "12",
          "--device", "cpu"]


def _env(threads: int) -> dict[str, str]:
    return launch_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))



def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sphere_ar_hf.cli", "sample", *SAMPLE, "--output-dir", str(out), *extra]


# ----------------------------------------------------------------------------- seeds and labels


def test_image_seeds_are_distinct_and_do_not_collide_across_seeds() -> None:
    n = np.arange(2000)
    table = np.stack([image_seeds(s, n) for s in range(20)])
    assert len(np.unique(table)) == table.size  # no two (seed, index) pairs share a generator seed
    assert not np.intersect1d(image_seeds(0, n + 1), image_seeds(1, n)).size
    np.testing.assert_array_equal(image_seeds(7, [5, 6]), image_seeds(7, np.arange(10))[5:7])  # per index
    with pytest.raises(ValueError, match="seed"):
        image_seeds(-1, n)


def test_image_labels_balanced_and_uniform() -> None:
    n = np.arange(100_000)
    np.testing.assert_array_equal(image_labels(0, n[:25], 10, "balanced"), n[:25] % 10)
    uniform = image_labels(3, n, 1000, "uniform")
    counts = np.bincount(uniform, minlength=1000)
    assert uniform.min() >= 0 and uniform.max() < 1000 and counts.min() > 50 and counts.max() < 150  # ~100 each
    np.testing.assert_array_equal(image_labels(3, n[10:20], 1000), uniform[10:20])
    assert (image_labels(4, n[:1000], 1000) != uniform[:1000]).mean() > 0.9
    with pytest.raises(ValueError, match="labels must be one of"):
        image_labels(0, n, 10, "random")


# ----------------------------------------------------------------------------- processes, batch sizes


def test_two_processes_write_the_same_file_as_one_with_another_batch_size(tmp_path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run(_sample_cmd(one, "--batch-size", "16"), env=_env(2), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(torchrun_command("-m", "sphere_ar_hf.cli", "sample", *SAMPLE, "--output-dir", two,
                                          "--batch-size", "5"), env=_env(1), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 processes" in res.stdout and "rank 1: shard" in res.stderr
    assert _sha(one / "samples.npz") == _sha(two / "samples.npz")
    samples = ImageSet(one / "samples.npz")
    assert samples.num_images == 40 and samples.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(samples.labels, image_labels(5, np.arange(40), 10, "uniform"))
    images = samples.images()
    assert len({images[i].tobytes() for i in range(40)}) == 40  # every image its own
    settings = json.loads((one / "sampling.json").read_text())
    assert settings["num_images"] == 40 and settings["sampler"] == "euler_maruyama" and settings["seed"] == 5


def test_kill9_then_resume_gives_the_same_file_without_redoing_shards(tmp_path) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert cli(["sample", *SAMPLE, "--output-dir", str(reference), "--batch-size", "8"]) == 0
    args = ["--num-images", "64", "--steps", "50", "--shard-size", "8"]  # 8 shards: slow enough to interrupt
    cmd = _sample_cmd(killed, "--batch-size", "8", *args)
    proc = subprocess.Popen(cmd, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed / "shards"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (shards.is_dir() and any(p.suffix == ".npz" for p in shards.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a shard was written"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.npz")}
    assert 1 <= len(done) < 8 and not (killed / "samples.npz").exists()
    # without --resume the folder is refused; with it, only the missing shards are sampled
    assert cli(["sample", *SAMPLE, "--output-dir", str(killed), *args]) == 2
    res = subprocess.run(cmd + ["--resume"], env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{len(done)} of 8 shards already done" in res.stderr
    assert all((shards / name).stat().st_mtime_ns == mtime for name, mtime in done.items())
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]
    uninterrupted = tmp_path / "uninterrupted"
    assert cli(["sample", *SAMPLE, "--output-dir", str(uninterrupted), "--batch-size", "16", *args]) == 0
    assert _sha(killed / "samples.npz") == _sha(uninterrupted / "samples.npz")
    assert _sha(reference / "samples.npz") != _sha(killed / "samples.npz")  # the settings matter


def test_sample_with_the_fast_sampler(tmp_path, capsys) -> None:
    """``--compile``: eager's images to float rounding, the same file for any batch size, recorded in sampling.json
    (a resume must match it; a record from before the setting existed reads as eager)."""
    from torch._dynamo.utils import counters

    eager, fast, fast8 = tmp_path / "eager", tmp_path / "fast", tmp_path / "fast8"
    assert cli(["sample", *SAMPLE, "--output-dir", str(eager), "--batch-size", "16"]) == 0
    torch._dynamo.reset()
    assert cli(["sample", *SAMPLE, "--output-dir", str(fast), "--batch-size", "16", "--compile"]) == 0
    assert counters["stats"]["unique_graphs"] > 0  # the compiled sampler ran
    assert "6 steps (compiled)" in capsys.readouterr().out
    assert cli(["sample", *SAMPLE, "--output-dir", str(fast8), "--batch-size", "8", "--compile"]) == 0
    torch._dynamo.reset()
    assert _sha(fast / "samples.npz") == _sha(fast8 / "samples.npz")
    a, b = ImageSet(eager / "samples.npz").images().astype(int), ImageSet(fast / "samples.npz").images().astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert json.loads((fast / "sampling.json").read_text())["fast_sampler"] is True
    assert json.loads((eager / "sampling.json").read_text())["fast_sampler"] is False
    capsys.readouterr()
    assert cli(["sample", *SAMPLE, "--output-dir", str(fast), "--resume"]) == 2
    assert "fast_sampler: True there, False now" in capsys.readouterr().err
    record = json.loads((eager / "sampling.json").read_text())
    del record["fast_sampler"]  # as runs recorded it before the setting existed
    (eager / "sampling.json").write_text(json.dumps(record))
    before = _sha(eager / "samples.npz")
    assert cli(["sample", *SAMPLE, "--output-dir", str(eager), "--resume"]) == 0
    assert _sha(eager / "samples.npz") == before


def test_sample_with_vae_slicing(tmp_path, capsys) -> None:
    """``--vae-slicing``: the default run's images to float rounding, recorded in sampling.json (a resume must
    match it)."""
    plain, sliced = tmp_path / "plain", tmp_path / "sliced"
    assert cli(["sample", *SAMPLE, "--output-dir", str(plain), "--batch-size", "16"]) == 0
    assert cli(["sample", *SAMPLE, "--output-dir", str(sliced), "--batch-size", "16", "--vae-slicing"]) == 0
    a, b = ImageSet(plain / "samples.npz").images().astype(int), ImageSet(sliced / "samples.npz").images().astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert json.loads((sliced / "sampling.json").read_text())["vae_slicing"] is True
    assert json.loads((plain / "sampling.json").read_text())["vae_slicing"] is False
    capsys.readouterr()
    assert cli(["sample", *SAMPLE, "--output-dir", str(sliced), "--resume"]) == 2
    assert "vae_slicing: True there, False now" in capsys.readouterr().err


def test_png_images_equal_the_npz(tmp_path) -> None:
    from PIL import Image

    out = tmp_path / "png"
    assert cli(["sample", *SAMPLE, "--output-dir", str(out), "--num-images", "10", "--png"]) == 0
    images = ImageSet(out / "samples.npz").images()
    for n in range(10):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / f"{n:06d}.png")), images[n])


# ----------------------------------------------------------------------------- alone = in a batch, bit for bit
# Image k made alone equals image k made in a batch of 7 (same label, same per-image seed), bit for bit in its floats
# before quantisation, through the batching helper and each front-end (generate, sample, the demo): each pipeline call
# is padded to a multiple of ROW_QUANTUM images (sphere_ar_hf.batching). Without the padding the CPU's matrix products
# round a batch of 1 and one of 7 differently (up to ~7e-7 on the digits model), and every test here fails.
LABELS = [3, 1, 4, 1, 5, 9, 2]


@pytest.fixture
def decoded(monkeypatch) -> Iterator[list[torch.Tensor]]:
    """The decoder's float output of every pipeline call (one tensor per call, padding rows included), on one
    thread (the commands run with --threads 1)."""
    from sphere_ar_hf import SphereVAE

    calls, real_decode = [], SphereVAE.decode

    def decode(self, *args, **kwargs):
        out = real_decode(self, *args, **kwargs)
        calls.append(out.sample.detach().clone())
        return out

    monkeypatch.setattr(SphereVAE, "decode", decode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield calls
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from sphere_ar_hf import SphereARPipeline
    from sphere_ar_hf.pretrained import bundled_model_path

    pipe = SphereARPipeline.from_pretrained(bundled_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _assert_alone_equals_batched(alone: list[torch.Tensor], batched: torch.Tensor) -> None:
    assert len(alone) == len(LABELS) and len(batched) >= len(LABELS)
    for k, image in enumerate(alone):
        assert torch.equal(image, batched[k]), (k, float((image - batched[k]).abs().max()))


def test_helper_makes_an_image_alone_as_in_a_batch_of_7(digits, decoded) -> None:
    from sphere_ar_hf.batching import ROW_QUANTUM, generate_padded, padded_batches, padded_size
    from sphere_ar_hf.seeding import image_generators

    call = dict(num_inference_steps=2, guidance_scale=2.0)
    batch = generate_padded(digits, LABELS, image_generators(7, 7), 7, output_type="pt", **call)
    alone = [generate_padded(digits, [c], image_generators(7, [k]), 1, output_type="pt", **call)[0]
             for k, c in enumerate(LABELS)]
    _assert_alone_equals_batched(alone, batch)
    assert [len(x) for x in decoded] == [ROW_QUANTUM] * 8  # each call padded to 8 images
    _assert_alone_equals_batched([x[0] for x in decoded[1:]], decoded[0])
    # every output type, in order; batches of 3 (3 calls of 8 images) give the same bits
    pil = generate_padded(digits, LABELS, image_generators(7, 7), 3, **call)
    assert [np.asarray(im).tobytes() for im in pil] == [
        (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy().tobytes() for x in batch]
    np.testing.assert_array_equal(generate_padded(digits, LABELS, image_generators(7, 7), 3, output_type="np",
                                                  **call), batch.permute(0, 2, 3, 1).numpy())
    latents = generate_padded(digits, LABELS[:2], image_generators(7, 2), 1, output_type="latent", **call)
    assert latents.shape == (2, digits.transformer.config.num_image_tokens, 16)
    assert padded_size(1) == padded_size(8) == 8 and padded_size(9) == 16
    seen = []
    starts = [start for start, _ in padded_batches(digits, LABELS, image_generators(7, 7), 3,
                                                   on_batch=lambda i, n: seen.append((i, n)), **call)]
    assert starts == [0, 3, 6] and seen == [(0, 3), (1, 3), (2, 3)]
    for args, message in (((LABELS, image_generators(7, 6), 3), "6 generators for 7 labels"),
                          (([], [], 3), "at least one class label"),
                          ((LABELS, image_generators(7, 7), 0), "batch_size must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            generate_padded(digits, *args, **call)


def _command_alone_and_in_a_batch_of_7(argv: list[str], tmp_path: Path, decoded: list[torch.Tensor]) -> None:
    """Run the command with --batch-size 1 (into tmp_path/one) and 7 (tmp_path/seven): the same floats."""
    assert cli([*argv, "--threads", "1", "--batch-size", "1", "--output-dir", str(tmp_path / "one")]) == 0
    alone = [x[0] for x in decoded]
    decoded.clear()
    assert cli([*argv, "--threads", "1", "--batch-size", "7", "--output-dir", str(tmp_path / "seven")]) == 0
    (batch,) = decoded
    _assert_alone_equals_batched(alone, batch)


def test_generate_makes_an_image_alone_as_in_a_batch_of_7(tmp_path, decoded) -> None:
    from PIL import Image

    argv = ["generate", "--class-labels", *map(str, LABELS), "--steps", "2", "--seed", "7", "--scale", "1"]
    _command_alone_and_in_a_batch_of_7(argv, tmp_path, decoded)
    for k in range(len(LABELS)):
        name = next((tmp_path / "one").glob(f"{k:03d}_*.png")).name
        with Image.open(tmp_path / "one" / name) as a, Image.open(tmp_path / "seven" / name) as b:
            assert a.tobytes() == b.tobytes()


def test_sample_makes_an_image_alone_as_in_a_batch_of_7(tmp_path, decoded) -> None:
    argv = ["sample", "--num-images", "7", "--labels", "uniform", "--seed", "7", "--steps", "2", "--device", "cpu"]
    _command_alone_and_in_a_batch_of_7(argv, tmp_path, decoded)
    assert _sha(tmp_path / "one" / "samples.npz") == _sha(tmp_path / "seven" / "samples.npz")


def test_demo_makes_an_image_alone_as_in_a_batch_of_7(digits, decoded) -> None:
    """Image k of a request has the seed of (S, k), so image 0 made alone is image 0 of a request of 7 images."""
    from sphere_ar_hf.demo import DemoRunner

    runner = DemoRunner(digits)
    labels = [str(c) for c in LABELS]
    alone, _ = runner.generate(labels[:1], 1, 2.0, "linear", 2, 7, progress=lambda *a, **k: None)
    batch, _ = runner.generate(labels, 1, 2.0, "linear", 2, 7, progress=lambda *a, **k: None)
    first, second = decoded
    assert torch.equal(first[0], second[0]), float((first[0] - second[0]).abs().max())
    assert len(first) == len(second) == 8  # each request in one call of 8 images
    assert alone[0][0].tobytes() == batch[0][0].tobytes()
    runner.generate(labels[:1], 7, 2.0, "linear", 2, 7, progress=lambda *a, **k: None)
    assert torch.equal(decoded[2][0], first[0])  # image 0 of 7 images of one class: the same bits


# ----------------------------------------------------------------------------- errors


def test_sample_errors(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--output-dir", str(blocker / "sub")], "cannot write samples there"),
        (["--output-dir", str(tmp_path / "a"), "--num-images", "0"], "positive integer"),
        (["--output-dir", str(tmp_path / "a"), "--labels", "random"], "invalid choice"),
        (["--output-dir", str(tmp_path / "a"), "--sampler", "ddim"], "invalid choice"),
        (["--output-dir", str(tmp_path / "a"), "--model", str(tmp_path / "nowhere")], "no such folder"),
    ]
    for extra, needle in cases:
        code = cli(["sample", *SAMPLE, *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err, (extra, err)
    run = tmp_path / "run"
    assert cli(["sample", *SAMPLE, "--output-dir", str(run), "--num-images", "8"]) == 0
    capsys.readouterr()
    for extra, needle in ((["--num-images", "16"], "num_images: 8 there, 16 now"),
                          (["--num-images", "8", "--labels", "balanced"], "labels: 'uniform' there, 'balanced' now"),
                          (["--num-images", "8", "--steps", "7"], "num_inference_steps: 6 there, 7 now")):
        code = cli(["sample", *SAMPLE, "--output-dir", str(run), "--resume", *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and needle in err, err
    assert cli(["sample", *SAMPLE, "--output-dir", str(run), "--num-images", "8"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    # resuming a finished run rewrites the same file
    before = _sha(run / "samples.npz")
    assert cli(["sample", *SAMPLE, "--output-dir", str(run), "--num-images", "8", "--resume"]) == 0
    assert _sha(run / "samples.npz") == before
