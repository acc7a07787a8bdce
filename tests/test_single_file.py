"""``SphereARPipeline.from_single_file``: an official checkpoint as a pipeline in one call, from a local file or the
Hub (here a pre-filled Hub cache, read offline by huggingface_hub's own download code), the same models as
``sphere-ar convert`` writes; and ``sphere-ar convert --checkpoint`` with a Hub file."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sphere_ar_hf import SphereARPipeline, convert_official_checkpoint
from sphere_ar_hf.cli import main as cli
from sphere_ar_hf.official_checkpoint import ConversionError

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = "guolinke/SphereAR"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def same_weights(a: SphereARPipeline, b: SphereARPipeline) -> bool:
    pairs = [(a.transformer, b.transformer), (a.vae, b.vae)]
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
               for x, y in ((m.state_dict(), n.state_dict()) for m, n in pairs))


def images(pipe: SphereARPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe([207, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, fixture_dir: Path) -> Path:
    """A Hub cache as a download of guolinke/SphereAR leaves it: its files under snapshots/<commit>, refs/main."""
    cache = tmp_path_factory.mktemp("hub-cache")
    model = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = model / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    shutil.copyfile(fixture_dir / "ar.pt", snapshot / "SphereAR_B.pt")
    shutil.copyfile(fixture_dir / "vae.pt", snapshot / "vae.pt")
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(COMMIT)
    return cache


def test_a_local_checkpoint_gives_the_converted_pipeline(fixture_dir, converted_pipeline):
    pipe = SphereARPipeline.from_single_file(fixture_dir / "ar.pt")
    assert type(pipe) is SphereARPipeline and same_weights(pipe, converted_pipeline)
    assert pipe.id2label[207] == converted_pipeline.id2label[207] and not pipe.transformer.training
    assert torch.equal(images(pipe), images(converted_pipeline))
    raw = SphereARPipeline.from_single_file(str(fixture_dir / "ar.pt"), use_ema=False, dtype="bf16")
    reference = convert_official_checkpoint(fixture_dir / "ar.pt", use_ema=False)
    assert raw.transformer.dtype == raw.vae.dtype == torch.bfloat16
    assert same_weights(raw, reference.to(dtype=torch.bfloat16))


@pytest.mark.parametrize("link", [f"https://huggingface.co/{REPO}/blob/main/SphereAR_B.pt",
                                  f"https://huggingface.co/{REPO}/resolve/{COMMIT}/SphereAR_B.pt",
                                  f"{REPO}/SphereAR_B.pt"])
def test_a_hub_file_is_fetched_through_the_hub_cache(hub_cache, fixture_dir, converted_pipeline, link):
    pipe = SphereARPipeline.from_single_file(link, cache_dir=hub_cache, local_files_only=True)
    assert same_weights(pipe, converted_pipeline)
    with_vae = SphereARPipeline.from_single_file(link, vae_checkpoint=f"{REPO}/vae.pt", cache_dir=hub_cache,
                                                 local_files_only=True)
    assert same_weights(with_vae, convert_official_checkpoint(fixture_dir / "ar.pt",
                                                              vae_checkpoint=fixture_dir / "vae.pt"))


def test_convert_takes_a_hub_file(hub_cache, converted_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with contextlib.redirect_stdout(None):
        assert cli(["convert", "--checkpoint", f"https://huggingface.co/{REPO}/blob/main/SphereAR_B.pt",
                    "--output", str(tmp_path / "b")]) == 0
    assert same_weights(SphereARPipeline.from_pretrained(tmp_path / "b"), converted_pipeline)


@pytest.mark.parametrize(("link", "kwargs", "needles"), [
    ("no/such.pt", {}, ("checkpoint: no such file 'no/such.pt'", "owner/repo/file.pt")),
    ("./no/such/file.pt", {}, ("checkpoint: no such file",)),
    ("https://example.com/a/b/blob/main/x.pt", {}, ("checkpoint: no such file", "https://huggingface.co/")),
    (f"{REPO}/SphereAR_L.pt", {}, ("checkpoint: 'guolinke/SphereAR/SphereAR_L.pt' is no local file",
                                   "SphereAR_L.pt could not be fetched from the Hub repository guolinke/SphereAR")),
    (f"https://huggingface.co/{REPO}/blob/main/SphereAR_B.pt", {"revision": "v2"},
     ("revision='v2'", "names revision 'main'")),
])
def test_what_cannot_be_loaded_is_named_in_one_line(hub_cache, link, kwargs, needles):
    with pytest.raises(ConversionError) as info:
        SphereARPipeline.from_single_file(link, cache_dir=hub_cache, local_files_only=True, **kwargs)
    assert "\n" not in str(info.value) and all(n in str(info.value) for n in needles), str(info.value)


def test_bad_arguments_are_refused(fixture_dir):
    with pytest.raises(TypeError, match=r"from_single_file\(\) got unexpected keyword arguments \['subfolder'\]"):
        SphereARPipeline.from_single_file(fixture_dir / "ar.pt", subfolder="x")
    with pytest.raises(TypeError, match=r"checkpoint=3: expected a checkpoint file"):
        SphereARPipeline.from_single_file(3)
    with pytest.raises(TypeError, match=r"use_ema='no': expected True or False"):
        SphereARPipeline.from_single_file(fixture_dir / "ar.pt", use_ema="no")
    with pytest.raises(ValueError, match="dtype"):
        SphereARPipeline.from_single_file(fixture_dir / "ar.pt", dtype="int8")


def test_from_pretrained_points_official_checkpoints_to_from_single_file(fixture_dir, tmp_path):
    folder = tmp_path / "weights"  # as `huggingface-cli download guolinke/SphereAR --local-dir weights` leaves it
    folder.mkdir()
    shutil.copyfile(fixture_dir / "ar.pt", folder / "SphereAR_B.pt")
    for source, needle in ((folder, "holds checkpoints (SphereAR_B.pt), not a pipeline folder"),
                           (folder / "SphereAR_B.pt", "an official checkpoint loads with")):
        with pytest.raises(ValueError) as info:
            SphereARPipeline.from_pretrained(source)
        assert needle in str(info.value) and "from_single_file" in str(info.value) and "\n" not in str(info.value)


def test_a_home_relative_path_is_a_local_file(fixture_dir, converted_pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    shutil.copyfile(fixture_dir / "ar.pt", tmp_path / "weights" / "SphereAR_B.pt")
    assert same_weights(SphereARPipeline.from_single_file("~/weights/SphereAR_B.pt"), converted_pipeline)


# ---- the command line: --model takes an official checkpoint --------------------------------------------------------
GENERATE = ["--class-labels", "golden retriever", "3", "--steps", "2", "--seed", "1", "--threads", "1"]


def grid(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_and_sample_take_a_checkpoint_as_model(fixture_dir, hub_cache, tmp_path, monkeypatch):
    """``--model`` with a local ``.pt`` or a Hub file gives the images of the converted folder (class names come
    from the checkpoint's class count); a folder of checkpoints is named with the file to pass."""
    folder = tmp_path / "converted"
    with contextlib.redirect_stdout(None):
        assert cli(["convert", "--checkpoint", str(fixture_dir / "ar.pt"), "--output", str(folder)]) == 0
        assert cli(["generate", "--model", str(folder), *GENERATE, "--output", str(tmp_path / "a.png")]) == 0
        assert cli(["generate", "--model", str(fixture_dir / "ar.pt"), *GENERATE, "--output",
                    str(tmp_path / "b.png")]) == 0
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub_cache))
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        assert cli(["generate", "--model", f"{REPO}/SphereAR_B.pt", *GENERATE, "--output",
                    str(tmp_path / "c.png")]) == 0
        sample = ["--num-images", "3", "--steps", "2", "--threads", "1"]
        assert cli(["sample", "--model", str(folder), *sample, "--output-dir", str(tmp_path / "s1")]) == 0
        assert cli(["sample", "--model", str(fixture_dir / "ar.pt"), *sample, "--output-dir",
                    str(tmp_path / "s2")]) == 0
    assert np.array_equal(grid(tmp_path / "a.png"), grid(tmp_path / "b.png"))
    assert np.array_equal(grid(tmp_path / "a.png"), grid(tmp_path / "c.png"))
    with np.load(tmp_path / "s1" / "samples.npz") as one, np.load(tmp_path / "s2" / "samples.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])


def test_a_model_that_is_no_checkpoint_is_named_in_one_line(fixture_dir, tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copyfile(fixture_dir / "ar.pt", weights / "SphereAR_B.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for model, needle in ((weights, f"it holds SphereAR_B.pt: pass --model {weights / 'SphereAR_B.pt'}"),
                          (tmp_path / "missing.pt", "--model: no such file"),
                          (tmp_path / "junk.pt", "junk.pt: refused to unpickle")):
        assert cli(["generate", "--model", str(model), *GENERATE, "--output", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_a_space_serves_a_converted_folder_not_a_checkpoint(fixture_dir, tmp_path, capsys):
    """A Space would convert the checkpoint on every start: ``space`` says to serve the converted folder."""
    for model in (str(fixture_dir / "ar.pt"), f"{REPO}/SphereAR_B.pt"):
        assert cli(["space", "--model", model, "--output", str(tmp_path / "space")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "an official checkpoint: serve the folder `sphere-ar convert" in err[0], err
    assert not (tmp_path / "space").exists()
