"""Every Python block of the README runs as written: each in a fresh interpreter, offline, in a folder that holds
what the README's names refer to (a converted pipeline `sphere-ar-b`, an adapter `my-lora`, a pushed folder
`you/sphere-ar-b`, built here from the official-format tiny fixture)."""

from __future__ import annotations

import os
import re
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
    save_lora(add_lora(pipe.transformer, build_lora_config(rank=4)), work / "my-lora")
    build_push_folder(work / "sphere-ar-b", work / "you" / "sphere-ar-b", repo_id="you/sphere-ar-b", license="mit")
    return work


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4
    assert any("SphereARPipeline.from_pretrained" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(workdir: Path, index: int) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README block {index}:\n{BLOCKS[index]}\n{done.stderr[-3000:]}"
