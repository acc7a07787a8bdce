"""Nothing is lost: `--overwrite` / `overwrite=True` replaces only a folder of the kind the tool writes and never one
that holds an input of the run; replacements are atomic and leave no `.tmp-*` / `.old-*` debris, also for
`--output .`; the example scripts report user errors as one `error: ...` line with exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sphere_ar_hf import SphereARConfig, SphereVAE, utils
from sphere_ar_hf.utils import FOLDER_KINDS, OutputFolderError, check_output_folder, write_folder_atomically
from test_convert import assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-tiny"
AR = FIXTURE / "ar.pt"
assert AR.is_file(), f"missing the fixture {FIXTURE} (CI puts ../shared beside the repo)"

pytestmark = pytest.mark.usefixtures("one_thread")




def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def debris(*folders: Path) -> list[str]:
    """Staging / set-aside folders left in ``folders``."""
    return [p.name for f in folders for p in f.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "model.safetensors")


# ---- sphere-ar convert --overwrite ------------------------------------------------------------------------------
def test_overwrite_beside_the_input_checkpoint_is_refused(tmp_path) -> None:
    """The issue's case: `convert --checkpoint w/ar.pt --output w --overwrite` used to delete w/ar.pt."""
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(AR, w / "ar.pt")
    (w / "notes.txt").write_text("my notes")
    before = snapshot(w)
    code, stdout, err = run("convert", "--checkpoint", w / "ar.pt", "--output", w, "--overwrite")
    assert_one_line_error(code, err, "refusing to replace", str(w), "ar.pt", "input")
    assert stdout == ""
    assert snapshot(w) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_overwrite_of_a_pipeline_folder_holding_the_input_is_refused(pipeline_dir, tmp_path) -> None:
    """Even a real pipeline folder is kept when the checkpoint (or the S-VAE checkpoint) lies inside it."""
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    shutil.copy(AR, w / "transformer" / "ar.pt")
    before = snapshot(w)
    code, _, err = run("convert", "--checkpoint", AR, "--vae-checkpoint", w / "transformer" / "ar.pt", "--output", w,
                       "--overwrite")
    assert_one_line_error(code, err, "refusing to replace", "input")
    assert snapshot(w) == before and debris(tmp_path) == []


@pytest.mark.parametrize("extra", ["ar.pt", "notes.txt", "subdir/"])
def test_overwrite_of_a_folder_with_foreign_files_is_refused(extra, pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    if extra.endswith("/"):
        (w / extra).mkdir()
        (w / extra / "mine.txt").write_text("mine")
    else:
        (w / extra).write_bytes(b"mine")
    before = snapshot(w)
    code, _, err = run("convert", "--checkpoint", AR, "--output", w, "--overwrite")
    line = assert_one_line_error(code, err, "refusing to replace", "not a pipeline folder", f"it holds {extra}",
                                 "--output")
    assert "remove it yourself" in line
    assert snapshot(w) == before and sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_overwrite_of_a_folder_that_is_no_pipeline_is_refused(tmp_path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    (w / "old.txt").write_text("old")
    code, _, err = run("convert", "--checkpoint", AR, "--output", w, "--overwrite")
    assert_one_line_error(code, err, "not a pipeline folder", "no model_index.json")
    assert (w / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_overwrite_replaces_an_earlier_pipeline_folder(pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    (w / "README.md").write_text("an earlier push folder's card")  # what a pipeline folder may hold besides
    (w / "remote_pipeline.py").write_text("# remote code\n")
    code, stdout, err = run("convert", "--checkpoint", AR, "--output", w, "--overwrite")
    assert code == 0, err
    assert "ema weights" in stdout
    assert not (w / "README.md").exists() and not (w / "remote_pipeline.py").exists()
    got, old = transformer_weights(w), transformer_weights(pipeline_dir)
    assert not torch.equal(got["proj_in.weight"], old["proj_in.weight"])  # the 'ema' weights replaced 'model'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_output_dot_writes_and_replaces_the_current_folder_cleanly(tmp_path, monkeypatch) -> None:
    w = tmp_path / "w"
    w.mkdir()
    monkeypatch.chdir(w)
    code, _, err = run("convert", "--checkpoint", AR, "--output", ".")
    assert code == 0, err
    assert (w / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    first = snapshot(w)
    # not empty now: refused without --overwrite, replaced with it
    code, _, err = run("convert", "--checkpoint", AR, "--output", ".")
    assert_one_line_error(code, err, "not empty", "--overwrite")
    code, _, err = run("convert", "--checkpoint", AR, "--output", ".", "--no-ema", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"], "debris beside the folder"
    assert not [p.name for p in w.iterdir() if p.name.startswith(".")], "debris inside the folder"
    assert Path.cwd() == w and Path("model_index.json").is_file()  # the process is in the new folder
    assert snapshot(w) != first and set(snapshot(w)) == set(first)


def test_a_write_that_fails_midway_keeps_the_old_folder_and_leaves_no_debris(pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    before = snapshot(w)

    def half_then_fail(tmp: Path) -> None:
        (tmp / "model_index.json").write_text("{}")
        (tmp / "transformer").mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_folder_atomically(w, half_then_fail, overwrite=True, kind="pipeline")
    assert snapshot(w) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    # a refusal writes nothing either
    (w / "ar.pt").write_bytes(b"x")
    with pytest.raises(OutputFolderError, match="it holds ar.pt"):
        write_folder_atomically(w, lambda tmp: None, overwrite=True, kind="pipeline")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and (w / "ar.pt").read_bytes() == b"x"


def test_a_failed_rename_puts_the_old_folder_back(pipeline_dir, tmp_path, monkeypatch) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    before = snapshot(w)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # the new folder's rename into place
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        write_folder_atomically(w, lambda tmp: (tmp / "model_index.json").write_text("{}"), overwrite=True,
                                kind="pipeline")
    assert snapshot(w) == before and sorted(p.name for p in tmp_path.iterdir()) == ["w"]


# ---- the folder kinds and the input rule ------------------------------------------------------------------------
def test_folder_kinds(pipeline_dir, tmp_path) -> None:
    assert FOLDER_KINDS["pipeline"].problem(pipeline_dir) is None
    assert FOLDER_KINDS["model"].problem(pipeline_dir / "vae") is None
    assert FOLDER_KINDS["model"].problem(pipeline_dir) == "it has no config.json"
    assert FOLDER_KINDS["pipeline"].problem(pipeline_dir / "vae") == "it has no model_index.json"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("not json")
    assert "not readable JSON" in FOLDER_KINDS["pipeline"].problem(broken)
    # a latent cache: a save_to_disk folder plus latent_cache.json
    cache = tmp_path / "cache"
    datasets.Dataset.from_dict({"a": [1, 2]}).save_to_disk(str(cache), num_shards=2)
    (cache / "latent_cache.json").write_text("{}")
    assert FOLDER_KINDS["latent_cache"].problem(cache) is None
    (cache / "images").mkdir()
    assert FOLDER_KINDS["latent_cache"].problem(cache) == "it holds images/"
    lora = tmp_path / "lora"
    lora.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (lora / name).write_text("x")
    assert FOLDER_KINDS["lora"].problem(lora) is None
    (lora / "base.safetensors").write_text("x")
    assert FOLDER_KINDS["lora"].problem(lora) == "it holds base.safetensors"


def test_check_output_folder_rules(pipeline_dir, tmp_path) -> None:
    w = tmp_path / "w"
    shutil.copytree(pipeline_dir, w)
    assert check_output_folder(tmp_path / "new", kind="pipeline") == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", kind="pipeline")  # an empty folder is always fine
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_folder(w, kind="pipeline")
    assert check_output_folder(w, True, kind="pipeline", inputs=[tmp_path / "elsewhere", "someone/hub-id"]) == w
    for inside in (w, w / "vae", w / "transformer" / "model.safetensors"):  # the folder itself, a part of it
        with pytest.raises(OutputFolderError, match="an input of this run; choose another --pipeline_output_dir"):
            check_output_folder(w, True, kind="pipeline", inputs=[inside], option="--pipeline_output_dir")
    # relative and `..` spellings of the same place are the same place
    with pytest.raises(OutputFolderError, match="input"):
        check_output_folder(w / "vae" / "..", True, kind="pipeline", inputs=[w / "vae"])
    # the kind given must match
    with pytest.raises(OutputFolderError, match="not a LoRA adapter folder"):
        check_output_folder(w, True, kind="lora")


# ---- the other writers ------------------------------------------------------------------------------------------
def test_push_folder_and_space_folder_follow_the_rule(pipeline_dir, tmp_path) -> None:
    from sphere_ar_hf import hub

    out = tmp_path / "push"
    hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="mit")
    hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="apache-2.0", overwrite=True)
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="it holds mine.txt"):
        hub.build_push_folder(pipeline_dir, out, repo_id="me/tiny", license="mit", overwrite=True)
    # the source pipeline inside the output folder
    outer = tmp_path / "outer"
    shutil.copytree(pipeline_dir, outer)
    src = outer / "transformer" / "src"
    shutil.copytree(pipeline_dir, src)
    with pytest.raises(OutputFolderError, match="input"):
        hub.build_push_folder(src, outer, repo_id="me/tiny", license="mit", overwrite=True)
    assert (src / "model_index.json").is_file()
    space = tmp_path / "space"
    hub.build_space_folder(space, license="mit")
    hub.build_space_folder(space, license="apache-2.0", overwrite=True)
    (space / "ar.pt").write_bytes(b"x")
    with pytest.raises(OutputFolderError, match="not a Space folder .it holds ar.pt"):
        hub.build_space_folder(space, license="mit", overwrite=True)
    assert debris(tmp_path) == []


def _modes(folder: Path) -> set[tuple[str, int]]:
    """``("d" or "f", permission bits)`` of ``folder`` and everything below it."""
    return {("d" if p.is_dir() else "f", p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_written_folders_follow_the_umask(mask, pipeline_dir, tmp_path) -> None:
    """Folders renamed into place get the modes the umask gives (safetensors writes its files 0600 and staging
    folders used to be 0700): a LoRA adapter, a Space folder, a converted pipeline."""
    from sphere_ar_hf import hub
    from sphere_ar_hf.lora import add_lora, build_lora_config, save_lora
    from sphere_ar_hf.pipeline_sphere_ar import SphereARPipeline

    old = os.umask(mask)
    try:
        pipe = SphereARPipeline.from_pretrained(pipeline_dir)
        save_lora(add_lora(pipe.transformer, build_lora_config(rank=2)), tmp_path / "lora")
        hub.build_space_folder(tmp_path / "space", model=str(pipeline_dir), license="mit")
        code, _, err = run("convert", "--checkpoint", AR, "--output", tmp_path / "converted")
        assert code == 0, err
    finally:
        os.umask(old)
    for folder in ("lora", "space", "converted"):
        assert _modes(tmp_path / folder) == {("d", 0o777 & ~mask), ("f", 0o666 & ~mask)}, folder
    assert (tmp_path / "space" / "model" / "transformer" / "model.safetensors").is_file()


# ---- the example scripts: one-line errors -----------------------------------------------------------------------
def test_run_main_reports_user_errors_in_one_line(capsys) -> None:
    def user_error() -> None:
        raise ValueError("label column 'label': the dataset has labels in [0, 3],\n but class ids must lie in [0, 2)")

    with pytest.raises(SystemExit) as e:
        utils.run_main(user_error)
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: label column 'label': the dataset has labels in [0, 3], but class ids "
                                       "must lie in [0, 2)\n")
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: (_ for _ in ()).throw(FileNotFoundError(2, "No such file or directory", "x.json")))
    assert e.value.code == 2 and capsys.readouterr().err == "error: x.json: No such file or directory\n"
    with pytest.raises(SystemExit) as e:
        utils.run_main(lambda: None)
    assert e.value.code == 0

    def bug() -> None:
        raise RuntimeError("a programming error")

    with pytest.raises(RuntimeError, match="a programming error"):  # keeps its traceback
        utils.run_main(bug)


def test_every_example_uses_the_shared_helper() -> None:
    for script in sorted((ROOT / "examples").glob("*.py")):
        text = script.read_text()
        assert "run_main(main)" in text and "except" not in text.split('if __name__ == "__main__":')[-1], script


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny S-VAE folder, a 8-image dataset with labels 0..3 (save_to_disk) and a tiny transformer config."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    SphereVAE(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
              decoder_layers=1).save_pretrained(str(root / "vae"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": [i % 4 for i in range(8)]},
                               features=features).save_to_disk(str(root / "data"))
    SphereARConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, head_hidden_size=64, head_num_layers=1,
                   head_num_adaln=1, image_size=32, patch_size=16, num_classes=2,
                   num_class_tokens=1).to_json_file(str(root / "config.json"))
    return {"root": root, "vae": root / "vae", "data": root / "data", "config": root / "config.json"}


def _run_example(script: str, *argv: str | Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=600)


def _example_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.mark.parametrize("case", ["label-out-of-range", "refused-overwrite"])
def test_train_sphere_ar_example_user_errors(case, train_assets, tmp_path) -> None:
    out = tmp_path / "run"
    flags = {"pretrained_vae": train_assets["vae"], "config_file": train_assets["config"],
             "dataset_path": train_assets["data"], "num_classes": 2, "output_dir": out,
             "per_device_train_batch_size": 4, "max_steps": 1, "dataloader_num_workers": 0, "report_to": "none",
             "use_cpu": "true", "disable_tqdm": "true", "save_strategy": "no"}
    if case == "refused-overwrite":  # labels fit; the pipeline folder to replace holds the data
        flags["num_classes"] = 4
        flags["pipeline_output_dir"] = train_assets["root"]
    argv = [x for k, v in flags.items() for x in (f"--{k}", str(v))]
    before = snapshot(train_assets["root"])
    proc = _run_example("train_sphere_ar.py", *argv)
    if case == "label-out-of-range":
        _example_error(proc, "labels in [0, 3]", "[0, 2)", "--num_classes")
    else:
        _example_error(proc, "refusing to replace", "input", "--pipeline_output_dir")
    assert snapshot(train_assets["root"]) == before
    assert not (out / "pipeline").exists()
