"""The AR trainer on streamed images (``--dataset_name ... --streaming``, a local folder laid out like a Hub dataset
of two parquet files of different lengths) with two processes (``torchrun``, gloo, CPU): a run stopped at a
checkpoint and resumed trains the same weights, raw and EMA, as one that was not, bit for bit. (``accelerate``
reads the stream on the main process and hands each process its share of every batch; the S-VAE trainer's
streams are tested in ``test_train_vae_processes.py``.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import free_port
from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereVAE
from sphere_ar_hf.training.ema import EMA_WEIGHTS_NAME

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_sphere_ar.py"


@pytest.fixture(scope="module")
def stream_assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny S-VAE, a tiny transformer config and a parquet dataset repository of 24 + 12 images, 4 classes."""
    import datasets

    root = tmp_path_factory.mktemp("stream_assets")
    torch.manual_seed(0)
    SphereVAE(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
              decoder_layers=1).save_pretrained(str(root / "vae"))
    SphereARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
                   head_num_adaln=1, image_size=32, patch_size=16, num_classes=4,
                   num_class_tokens=4).to_json_file(str(root / "config.json"))
    rng = np.random.default_rng(0)
    images = []
    for i in range(36):
        a = np.full((40, 44, 3), 40, np.uint8)
        a[..., i % 3] = 200
        a[: 8 * (i % 4 + 1)] = 90
        images.append(Image.fromarray(np.clip(a + rng.integers(0, 40, a.shape), 0, 255).astype(np.uint8)))
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["red", "green", "blue", "grey"])})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 4 for i in range(36)]}, features=features)
    (root / "repo" / "data").mkdir(parents=True)
    for i, rows in enumerate((range(0, 24), range(24, 36))):
        ds.select(rows).to_parquet(str(root / "repo" / "data" / f"train-{i:05d}-of-00002.parquet"))
    return {"vae": root / "vae", "config": root / "config.json", "repo": root / "repo"}


def torchrun(assets: dict[str, Path], cwd: Path, out: Path, *args: str) -> str:
    """The AR training script with 2 processes on the stream, into ``out``; returns its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    flags = {"pretrained_vae": assets["vae"], "config_file": assets["config"], "dataset_name": assets["repo"],
             "shuffle_buffer_size": 0, "cache_dir": cwd / "hf-cache", "num_classes": 4,
             "per_device_train_batch_size": 2, "dataloader_num_workers": 0, "warmup_steps": 2, "decay_start": 6,
             "logging_steps": 1, "report_to": "none", "use_cpu": "true", "disable_tqdm": "true",
             "save_strategy": "steps", "save_steps": 4, "ema_decay": 0.9, "ddp_backend": "gloo", "output_dir": out}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(SCRIPT), "--streaming",
           *[x for k, v in flags.items() for x in (f"--{k}", str(v))], *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stderr


def test_streamed_two_process_run_resumes_as_one_run(stream_assets, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    torchrun(stream_assets, tmp_path, full, "--max_steps", "8")
    torchrun(stream_assets, tmp_path, split, "--max_steps", "4")
    assert "resuming from" in torchrun(stream_assets, tmp_path, split, "--max_steps", "8",
                                       "--resume_from_checkpoint", "latest")
    for name in ("model.safetensors", EMA_WEIGHTS_NAME):
        a, b = load_file(str(full / "checkpoint-8" / name)), load_file(str(split / "checkpoint-8" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    at_4, at_8 = (load_file(str(split / f"checkpoint-{s}" / "model.safetensors")) for s in (4, 8))
    assert any(not torch.equal(at_4[k], at_8[k]) for k in at_8)  # the steps after the resume trained
    pipe = SphereARPipeline.from_pretrained(str(split / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.id2label == {0: "red", 1: "green", 2: "blue", 3: "grey"}
    images = pipe([0, "grey"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
