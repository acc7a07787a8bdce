"""The AR trainer on streamed images (``--dataset_name ... --streaming``, a local folder laid out like a Hub dataset
of two parquet files of different lengths) with two processes (``torchrun``, gloo, CPU): a run stopped at a
checkpoint in the middle of an epoch and resumed trains the same weights, raw and EMA, as one that was not, bit for
bit. (``accelerate`` reads the stream on the main process and hands each process its share of every batch; the
S-VAE trainer's streams are tested in ``test_train_vae_processes.py``.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import TRAIN_AR_CLASS_NAMES, launch_env, torchrun_command
from sphere_ar_hf import SphereARPipeline
from sphere_ar_hf.training.ema import EMA_WEIGHTS_NAME

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_sphere_ar.py"


def parquet_repo(assets: dict[str, Path], root: Path) -> Path:
    """``assets``' 16 images as a Hub-style dataset repository of two parquet files, of 10 and 6 images."""
    import datasets

    images = datasets.load_from_disk(str(assets["data"]))
    (root / "data").mkdir(parents=True)
    for i, rows in enumerate((range(0, 10), range(10, 16))):
        images.select(rows).to_parquet(str(root / "data" / f"train-{i:05d}-of-00002.parquet"))
    return root


def torchrun(assets: dict[str, Path], repo: Path, cwd: Path, out: Path, *args: str) -> str:
    """The AR training script with 2 processes on the stream of ``repo``, into ``out``; returns its stderr."""
    flags = {"pretrained_vae": assets["vae"], "config_file": assets["config"], "dataset_name": repo,
             "shuffle_buffer_size": 0, "cache_dir": cwd / "hf-cache", "num_classes": 4,
             "per_device_train_batch_size": 1, "dataloader_num_workers": 0, "warmup_steps": 2, "decay_start": 6,
             "logging_steps": 1, "report_to": "none", "use_cpu": "true", "disable_tqdm": "true",
             "save_strategy": "steps", "save_steps": 4, "ema_decay": 0.9, "ddp_backend": "gloo", "output_dir": out}
    cmd = torchrun_command(SCRIPT, "--streaming", *[x for k, v in flags.items() for x in (f"--{k}", str(v))], *args)
    res = subprocess.run(cmd, env=launch_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stderr


def test_streamed_two_process_run_resumes_as_one_run(assets, tmp_path):
    """2 images a step: 8 steps an epoch, the resume at step 4 in the middle of it."""
    repo = parquet_repo(assets, tmp_path / "repo")
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(assets, repo, tmp_path, full, "--max_steps", "8")
    torchrun(assets, repo, tmp_path, split, "--max_steps", "4")
    assert "resuming from" in torchrun(assets, repo, tmp_path, split, "--max_steps", "8",
                                       "--resume_from_checkpoint", "latest")
    for name in ("model.safetensors", EMA_WEIGHTS_NAME):
        a, b = load_file(str(full / "checkpoint-8" / name)), load_file(str(split / "checkpoint-8" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    at_4, at_8 = (load_file(str(split / f"checkpoint-{s}" / "model.safetensors")) for s in (4, 8))
    assert any(not torch.equal(at_4[k], at_8[k]) for k in at_8)  # the steps after the resume trained
    pipe = SphereARPipeline.from_pretrained(str(split / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.id2label == dict(enumerate(TRAIN_AR_CLASS_NAMES))
    images = pipe([0, TRAIN_AR_CLASS_NAMES[3]], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
