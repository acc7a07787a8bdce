"""`sphere-ar generate` (and the parser of both subcommands) on the converted official-format tiny fixture."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sphere_ar_hf import convert_official_checkpoint
from sphere_ar_hf.cli import build_parser, grid_columns, main, make_grid, slugify

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-tiny"
STEPS = ("--steps", "2")


def run(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_line(err: str) -> str:
    """stderr must be exactly one `error: ...` line (no traceback, no loading bars)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    convert_official_checkpoint(FIXTURE / "ar.pt", out)
    return out


def test_output_dir_writes_each_image_and_a_grid(model, tmp_path) -> None:
    out = tmp_path / "samples"
    code, stdout, err = run("generate", "--model", model, "--class-labels", "207", "otter", "Goldfish", *STEPS,
                            "--batch-size", "2", "--scale", "1", "--output-dir", out)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_golden-retriever.png", "001_otter.png", "002_goldfish.png", "grid.png"]
    for name in names[:-1]:
        with Image.open(out / name) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 64 + 2 * 2, 64)  # 3 images: one full row of 3 cells, 2 px apart
        # the grid holds the images in order, row by row
        with Image.open(out / "001_otter.png") as otter:
            assert grid.crop((66, 0, 130, 64)).tobytes() == otter.tobytes()
    assert "wrote 3 images" in stdout and stdout.count("\n") == 1


def test_output_writes_only_the_grid(model, tmp_path) -> None:
    target = tmp_path / "nested" / "grid.png"
    code, stdout, err = run("generate", "--model", model, "--class-labels", "207", "360", *STEPS,
                            "--guidance-scale", "1", "--cfg-schedule", "constant", "--output", target)
    assert code == 0, err
    assert sorted(p.name for p in target.parent.iterdir()) == ["grid.png"]  # nothing else, no temporary files
    with Image.open(target) as grid:  # 64 px images, enlarged 2x by default (at least 128 px)
        assert grid.size == (2 * 128 + 2, 128)
    assert str(target) in stdout and "(2 images of 128x128" in stdout and "2 steps, cpu, " in stdout
    code, stdout, err = run("generate", "--model", model, "--class-labels", "207", "--steps", "1", "--scale", "3",
                            "--output", target)
    assert code == 0, err
    with Image.open(target) as grid:  # nearest neighbour: 3 x 3 blocks of one colour
        assert grid.size == (192, 192)
        assert all(grid.getpixel((x, y)) == grid.getpixel((3, 3)) for x in range(3, 6) for y in range(3, 6))
    assert "(1 image of 192x192" in stdout and "1 step, cpu, " in stdout


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).astype(np.int16)


def test_seeds_are_per_image_and_reproducible(model, tmp_path) -> None:
    # image k uses a generator seeded from a hash of (S, k): the same seed gives the same bytes, an image does not
    # depend on its batch (each batch is padded to a multiple of 8 images: the same bytes), and seeds S and S + 1
    # share no image (with S + k they would: seed 6's image 0 was seed 5's image 1)
    common = ("--model", model, *STEPS)
    labels = ("--class-labels", "otter", "otter", "otter")
    for name, argv in {"a": (*labels, "--seed", "5", "--batch-size", "3"),
                       "b": (*labels, "--seed", "5", "--batch-size", "3"),
                       "c": (*labels, "--seed", "5", "--batch-size", "1"),
                       "d": (*labels, "--seed", "6", "--batch-size", "3")}.items():
        code, stdout, err = run("generate", *common, *argv, "--output-dir", tmp_path / name)
        assert code == 0, err
    assert "seed 6, images 0..2" in stdout  # the summary of the last run, d
    a, b, c, d = (tmp_path / n for n in "abcd")
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}
    names = [f"{k:03d}_otter.png" for k in range(3)]
    for name in names:
        assert (c / name).read_bytes() == (a / name).read_bytes(), name
    # every pair of images differs, within seed 5 and across seeds 5 and 6
    images = [_pixels(folder / name) for folder in (a, d) for name in names]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 5, (i, j)


@pytest.mark.parametrize("labels, needles", [
    (["207", "golden retreiver"], ["unknown class name 'golden retreiver'", "'golden retriever'"]),
    (["1000"], ["out of range", "0..999"]),
    (["-1"], ["out of range"]),
])
def test_bad_class_labels(labels, needles, model, tmp_path) -> None:
    code, stdout, err = run("generate", "--model", model, "--class-labels", *labels, *STEPS,
                            "--output-dir", tmp_path / "out")
    assert code == 2
    line = error_line(err)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists() and stdout == ""


def test_bad_model_and_options(model, tmp_path) -> None:
    code, _, err = run("generate", "--model", tmp_path / "nope", "--class-labels", "1", "--output", tmp_path / "g.png")
    assert code == 2 and "no such folder" in error_line(err)
    code, _, err = run("generate", "--model", tmp_path, "--class-labels", "1", "--output", tmp_path / "g.png")
    assert code == 2 and "model_index.json" in error_line(err)
    code, _, err = run("generate", "--model", model, "--class-labels", "1", "--output", tmp_path / "g.xyz")
    assert code == 2 and "generate writes PNG images: name the file .png, not '.xyz'" in error_line(err)
    code, _, err = run("generate", "--model", model, "--class-labels", "1", "--output", tmp_path / "g.jpg")
    assert code == 2 and "not '.jpg'" in error_line(err)
    code, _, err = run("generate", "--model", model, "--class-labels", "1", "--output", tmp_path / "g.png",
                       "--device", "nonsense")
    assert code == 2 and "--device" in error_line(err)
    code, _, err = run("generate", "--model", model, "--class-labels", "1", "--output", tmp_path / "g.png",
                       "--device", "meta")
    assert code == 2 and "--device meta: expected cpu, cuda" in error_line(err)
    assert list(tmp_path.iterdir()) == []
    # argparse usage errors: status 2 too
    for argv in (["generate", "--model", str(model), "--class-labels", "1"],  # no output
                 ["generate", "--model", str(model), "--class-labels", "1", "--output", "a.png", "--output-dir", "d"],
                 ["generate", "--model", str(model), "--class-labels", "1", "--output", "a.png", "--steps", "0"],
                 ["generate", "--model", str(model), "--class-labels", "1", "--output", "a.png", "--cfg-schedule", "x"],
                 ["convert", "--output", "x"], []):
        code, _, err = run(*argv)
        assert code == 2 and "usage:" in err, argv


OPTIONS = {
    "convert": ["--checkpoint", "--output", "--vae-checkpoint", "--no-ema", "--num-heads", "--vae-num-heads",
                "--overwrite"],
    "generate": ["--model", "--class-labels", "--guidance-scale", "--cfg-schedule", "--steps", "--seed",
                 "--batch-size", "--device", "--dtype", "--output", "--output-dir", "--grid-cols", "--threads"],
    "sample": ["--model", "--num-images", "--output-dir", "--labels", "--batch-size", "--seed", "--guidance-scale",
               "--cfg-schedule", "--steps", "--sampler", "--time-shift", "--shard-size", "--png", "--resume",
               "--device", "--dtype", "--threads"],
    "evaluate": ["--features", "--inception-weights", "--batch-size", "--device", "--k", "--split-size",
                 "--no-precision-recall", "--json"],
}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_help_mentions_every_option(command: str) -> None:
    code, stdout, _ = run(command, "--help")
    assert code == 0
    for option in OPTIONS[command]:
        assert f"{option} " in stdout or f"{option}\n" in stdout, option
    # and every option the parser has is documented
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in stdout
    if command == "generate":
        assert "hash of (S, k)" in " ".join(stdout.split())  # the per-image seed rule is documented
        top = run("--help")[1]
        assert "ImageNet" not in top and "embedded digits model" in " ".join(top.split())  # the default model
        for choice in ("linear", "constant", "float32", "bfloat16", "float16"):
            assert choice in stdout


def test_make_grid_and_slugify() -> None:
    ims = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(ims, ncols=2, padding=1)
    assert grid.size == (2 * 8 + 1, 3 * 6 + 2)
    assert grid.getpixel((9, 7)) == (120, 0, 0)  # image 3: row 1, column 1
    assert grid.getpixel((12, 15)) == (255, 255, 255)  # the empty last cell
    assert make_grid(ims[:1]).size == (8, 6)
    assert make_grid(ims).size == (3 * 8 + 2 * 2, 2 * 6 + 2)  # ceil(sqrt(5)) = 3 columns
    assert make_grid(ims * 2).size == (5 * 8 + 4 * 2, 2 * 6 + 2)  # 10 images: 5 x 2, no empty cell
    assert [grid_columns(n) for n in (1, 2, 3, 4, 6, 7, 8, 10, 12, 16, 50)] == [1, 2, 3, 2, 3, 3, 4, 5, 4, 4, 10]
    with pytest.raises(ValueError):
        make_grid([Image.new("RGB", (8, 6)), Image.new("RGB", (6, 8))])
    assert slugify("tench, Tinca tinca") == "tench-tinca-tinca"
    assert slugify("jack-o'-lantern") == "jack-o-lantern"
    assert slugify("!!!") == "image"


def test_generate_without_model_uses_the_embedded_digits_model(tmp_path) -> None:
    out = tmp_path / "grid.png"
    code, _, err = run("generate", "--class-labels", "3", "7", "--steps", "2", "--output", out)
    assert code == 0, err
    with Image.open(out) as im:
        assert im.width >= 2 * 16 and im.height >= 16  # two 16 px digits side by side


def test_generate_with_the_fast_sampler(tmp_path) -> None:
    """``--compile``: the compiled sampler runs (dynamo compiles its graphs), eager's grid to one uint8 level."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    grids = []
    torch._dynamo.reset()
    for extra in ((), ("--compile",)):
        out, graphs = tmp_path / f"grid{len(extra)}.png", counters["stats"]["unique_graphs"]
        code, _, err = run("generate", "--class-labels", "3", "7", "--steps", "4", "--seed", "1", "--output", out,
                           *extra)
        assert code == 0, err
        assert (counters["stats"]["unique_graphs"] > graphs) == bool(extra)
        with Image.open(out) as im:
            grids.append(np.asarray(im, dtype=int))
    torch._dynamo.reset()
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).max() <= 1


def test_help_imports_no_heavy_library() -> None:
    # `sphere-ar --help` and each command's --help start in a fraction of a second: the package's names and the
    # command line load torch, diffusers and transformers only when a command runs
    import subprocess
    import sys

    code = ("import contextlib, io, sys\n"
            "from sphere_ar_hf.cli import main\n"
            "for argv in ([], ['generate'], ['convert'], ['sample'], ['evaluate'], ['push'], ['space']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert main([*argv, '--help']) == 0, argv\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ---- threads ---------------------------------------------------------------------------------------------------------
def test_auto_threads_leaves_busy_cores_alone(monkeypatch) -> None:
    import os

    from sphere_ar_hf import utils

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for load, threads in ((0.0, 2), (0.4, 2), (0.9, 1), (1.6, 1), (7.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        assert utils.auto_threads() == threads, load
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one torchrun launch share the cores
    assert utils.auto_threads() == 1


def test_threads_option(tmp_path, monkeypatch) -> None:
    import torch

    from sphere_ar_hf import cli, cli_common

    before = torch.get_num_threads()
    try:
        assert cli_common.threads_argument("auto") == "auto" and cli_common.threads_argument("3") == 3
        monkeypatch.setattr(cli, "set_threads", lambda n, real=cli.set_threads: calls.append(n) or real(n))
        calls: list = []
        code, _, err = run("generate", "--class-labels", "1", "--steps", "1", "--threads", "1", "--output",
                           tmp_path / "a.png")
        assert code == 0, err
        assert calls == [1] and torch.get_num_threads() == 1
        assert "tokens: 100%" in err and "4/4 [" in err and "token/s" in err  # the bar counts the 4 tokens
        assert cli.set_threads("auto") >= 1
    finally:
        torch.set_num_threads(before)
    code, _, err = run("generate", "--class-labels", "1", "--threads", "0", "--output", tmp_path / "b.png")
    assert code == 2 and "--threads: expected a positive integer, got 0" in err


def test_labels_are_checked_before_the_weights_load(tmp_path, monkeypatch) -> None:
    from sphere_ar_hf import cli

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the labels were checked")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    for label, message in (("12", "out of range"), ("eleven", "eleven")):
        code, _, err = run("generate", "--class-labels", "3", label, "--output", tmp_path / "a.png")
        assert code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_guidance_and_steps_are_checked_by_their_owners(tmp_path, monkeypatch) -> None:
    """--guidance-scale goes to the config's check_guidance_scale before anything loads (its error under the flag's
    name, one line), --steps to the scheduler's check_num_inference_steps (an argparse usage error)."""
    from sphere_ar_hf import cli, cli_sampling

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded before the guidance scale was checked")

    monkeypatch.setattr(cli, "load_pipeline", no_load)
    monkeypatch.setattr(cli_sampling, "load_pipeline", no_load)
    for command in (["generate", "--class-labels", "3", "--output", tmp_path / "a.png"],
                    ["sample", "--num-images", "2", "--output-dir", tmp_path / "s"]):
        for value, got in (("nan", "got nan"), ("1e39", "got 1e+39"), ("-inf", "got -inf")):
            code, stdout, err = run(*command, f"--guidance-scale={value}")
            line = error_line(err)
            assert code == 2 and stdout == "" and line.startswith("error: --guidance-scale: guidance_scale must be a "
                                                                  "finite float32 number") and got in line, line
        code, _, err = run(*command, "--guidance-scale", "abc")
        assert code == 2 and "usage:" in err and "argument --guidance-scale: expected a number, got 'abc'" in err
        for steps in ("0", "-2", "1.5"):
            code, _, err = run(*command, f"--steps={steps}")
            assert code == 2 and "usage:" in err and f"argument --steps: expected a positive integer, got '{steps}'" \
                in err, err
    assert list(tmp_path.iterdir()) == []


def test_load_pipeline_passes_the_dtype_under_the_installed_diffusers_name() -> None:
    """``--dtype``: SphereARPipeline.from_pretrained passes it to diffusers as ``dtype`` (0.40 on) or ``torch_dtype``
    (before), chosen from diffusers' public version, without a deprecation warning."""
    import warnings

    import diffusers
    import torch
    from packaging.version import Version

    from sphere_ar_hf.cli_common import DEFAULT_MODEL, load_pipeline
    from sphere_ar_hf.pipeline_sphere_ar import DIFFUSERS_DTYPE_KWARG

    assert DIFFUSERS_DTYPE_KWARG == ("dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        pipe = load_pipeline(DEFAULT_MODEL, "bfloat16")
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16


def test_a_cuda_device_is_checked_and_made_current(monkeypatch) -> None:
    """``--device cuda:N`` becomes the process's current CUDA device (CUDA graphs, streams and pinned memory use the
    current one: a rank sampling on cuda:1 with cuda:0 current would capture empty graphs on cuda:0); under
    torchrun a bare ``cuda`` is ``cuda:LOCAL_RANK``, made current too; a device the machine lacks is a one-line
    error. CUDA is emulated: two devices."""
    import torch

    from sphere_ar_hf.cli_common import CLIError, device_from_name
    from sphere_ar_hf.cli_sampling import sampling_device

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    assert device_from_name("cuda:1") == torch.device("cuda:1") and current == [torch.device("cuda:1")]
    assert device_from_name("cuda") == torch.device("cuda") and len(current) == 1  # no index: left as it is
    # cuda:0 is current in a new process (and ZeroGPU's main process must not initialise CUDA)
    assert device_from_name("cuda:0") == torch.device("cuda:0") and len(current) == 1
    assert sampling_device(None, world=2, local_rank=1) == torch.device("cuda:1") and current[-1] == torch.device(
        "cuda:1") and len(current) == 2
    assert sampling_device("cpu", world=2, local_rank=1) == torch.device("cpu") and len(current) == 2
    with pytest.raises(CLIError, match=r"^--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$"):
        device_from_name("cuda:2")
