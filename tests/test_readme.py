"""Every Python block of the README runs as written: each in a fresh interpreter, offline, in a folder that holds
what the README's names refer to (a converted pipeline `sphere-ar-b`, an adapter `my-lora`, a pushed folder
`you/sphere-ar-b`, the Hub cache of `guolinke/SphereAR`, built here from the official-format tiny fixture)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "official-tiny"
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from sphere_ar_hf import convert_official_checkpoint
    from sphere_ar_hf.hub import build_push_folder
    from sphere_ar_hf.lora import add_lora, build_lora_config, save_lora

    work = tmp_path_factory.mktemp("readme")
    pipe = convert_official_checkpoint(FIXTURE / "ar.pt", work / "sphere-ar-b")
    # guolinke/SphereAR in a Hub cache, as a download leaves it: from_single_file's URL is read from it, offline
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = work / "hub-cache" / "models--guolinke--SphereAR"
    (model / "snapshots" / commit).mkdir(parents=True)
    shutil.copyfile(FIXTURE / "ar.pt", model / "snapshots" / commit / "SphereAR_B.pt")
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(commit)
    save_lora(add_lora(pipe.transformer, build_lora_config(rank=4)), work / "my-lora")
    build_push_folder(work / "sphere-ar-b", work / "you" / "sphere-ar-b", repo_id="you/sphere-ar-b", license="mit")
    return work


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4
    assert any("SphereARPipeline.from_pretrained" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(workdir: Path, index: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_CACHE": str(workdir / "hub-cache")}
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"


# ---- the quick start: the two lines .ci/run runs, and the picture the first one writes --------------------------
def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_has_two_marked_lines_that_ci_runs() -> None:
    lines = _script("quickstart_commands").quickstart_commands(ROOT / "README.md")
    assert len(lines) == 2
    assert "sphere-ar generate" in lines[0] and "--index-url" not in lines[0]
    assert lines[1].endswith("python -m pytest -q tests")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/quickstart_commands.py README.md" in ci and "SPHERE_AR_REQUIRE_BROWSER=1" in ci


def test_the_readme_grid_is_what_the_quickstart_writes(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from sphere_ar_hf.cli import main as cli

    args = _script("make_doc_images").generate_arguments(ROOT / "README.md")
    args[args.index("--output") + 1] = str(tmp_path / "grid.png")
    assert cli(["generate", *args, "--threads", "1"]) == 0
    made = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"), dtype=np.int16)
    shipped = np.asarray(Image.open(ROOT / "docs" / "digits_grid.png").convert("RGB"), dtype=np.int16)
    assert made.shape == shipped.shape  # the same layout (10 digits: 5 x 2)
    assert np.abs(made - shipped).mean() < 0.5  # the same images, up to float rounding on another CPU
