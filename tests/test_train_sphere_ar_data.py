"""AR-model training data routes: the classes come from the dataset (a mismatch is refused), training from a latent
cache, and two processes (torchrun) that train on disjoint data, evaluate and save a pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TRAIN_AR_CLASS_NAMES as CLASS_NAMES
from conftest import torchrun_command
from sphere_ar_hf import SphereARPipeline
from sphere_ar_hf.evaluation.sampling import image_labels, sample_images
from sphere_ar_hf.seeding import image_seeds
from sphere_ar_hf.training.arguments import ModelArguments
from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.evaluation_log import EvaluationLog, ImageMetric
from sphere_ar_hf.training.trainer import train_sphere_ar
from test_train_sphere_ar import (
    PROBE,
    TIMEOUT,
    example_cli,
    load_example,
    subprocess_env,
    tiny_args,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_classes_come_from_the_dataset_and_a_mismatch_is_refused(assets, tmp_path, capsys):
    """The README's "Your own images" route: an imagefolder and no --num_classes gives a model with the folders'
    classes and names; an explicit --num_classes that differs is a one-line error before training."""
    folder = tmp_path / "train"
    for c, name in enumerate(["cat", "dog"]):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 60 + 100 * c + i, np.uint8)).save(folder / name / f"{i}.png")
    model_args = ModelArguments(pretrained_vae=str(assets["vae"]), config_file=str(assets["config"]))
    out = train_sphere_ar(model_args, DataArguments(train_data_dir=str(folder), resolution=32),
                          tiny_args(tmp_path, max_steps=1, ema_decay=0.0))
    pipe = SphereARPipeline.from_pretrained(str(out))
    assert pipe.transformer.config.num_classes == 2 and pipe.id2label == {0: "cat", 1: "dog"}

    from sphere_ar_hf.utils import run_main

    argv = example_cli(assets, tmp_path / "wrong", num_classes=1000, max_steps=1)
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_example().main, argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --num_classes 1000 does not match the dataset: label column 'label' names 4 classes "
                      "(red, green, blue, grey); drop --num_classes to use the dataset's"]
    assert not (tmp_path / "wrong").exists()  # refused before training
    # the same from a latent cache (whose class count is the dataset's, 4)
    from sphere_ar_hf.training.latent_cache import cache_latents, load_vae

    cache_latents(load_vae(assets["vae"]), DataArguments(dataset_path=str(assets["data"]), resolution=32),
                  tmp_path / "cache", batch_size=8, disable_tqdm=True)
    with pytest.raises(ValueError, match="--num_classes 3 does not match the latent cache .* 4 classes"):
        train_sphere_ar(model_args, DataArguments(latent_cache=str(tmp_path / "cache"), num_classes=3),
                        tiny_args(tmp_path, max_steps=1))


def test_training_from_a_latent_cache(assets, tmp_path):
    from sphere_ar_hf.training.latent_cache import cache_latents, load_vae

    data_args = DataArguments(dataset_path=str(assets["data"]), num_classes=4, resolution=32)
    cache_latents(load_vae(assets["vae"]), data_args, tmp_path / "cache", batch_size=8)
    model_args = ModelArguments(pretrained_vae=str(assets["vae"]), config_file=str(assets["config"]))
    out = train_sphere_ar(model_args, DataArguments(latent_cache=str(tmp_path / "cache"), num_classes=4),
                          tiny_args(tmp_path, max_steps=2, ema_decay=0.9999))
    pipe = SphereARPipeline.from_pretrained(str(out))
    assert pipe.id2label == dict(enumerate(CLASS_NAMES)) and pipe.transformer.config.num_classes == 4


def test_two_processes_train_on_disjoint_data_and_save_a_pipeline(assets, tmp_path):
    index_dir, out = tmp_path / "indices", tmp_path / "ddp"
    index_dir.mkdir()
    cmd = torchrun_command(PROBE, *example_cli(assets, out, num_train_epochs=2, save_strategy="no",
                                               per_device_train_batch_size=2, decay_start=4, logging_steps=2,
                                               ddp_backend="gloo", eval_images=9, eval_steps=8,
                                               eval_features="digits", eval_num_inference_steps=2,
                                               per_device_eval_batch_size=8))
    res = subprocess.run(cmd, env=subprocess_env(SPHERE_AR_PROBE_INDEX_DIR=str(index_dir)), capture_output=True,
                         text=True, cwd=tmp_path, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    seen = {}
    for rank in (0, 1):
        rows = [tuple(map(int, line.split())) for line in (index_dir / f"rank{rank}.txt").read_text().split("\n")
                if line]
        seen[rank] = rows
        assert all(label == index % 4 for _, index, label in rows)  # the dataset's labels
    for epoch in (0, 1):
        r0 = [i for e, i, _ in seen[0] if e == epoch]
        r1 = [i for e, i, _ in seen[1] if e == epoch]
        assert len(r0) == len(r1) == 8  # both ranks trained: 4 steps x batch 2 each
        assert not set(r0) & set(r1) and set(r0) | set(r1) == set(range(16))
    assert sorted(i for e, i, _ in seen[0] if e == 0) != sorted(i for e, i, _ in seen[0] if e == 1)  # reshuffled
    state = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert {"transformer", "vae", "scheduler"} <= set(state)
    pipe = SphereARPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.id2label == dict(enumerate(CLASS_NAMES))
    images = pipe(["blue", 0], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    # the evaluation at the last step, split over the two ranks (5 + 4 images), measured the final (EMA) weights
    (record,) = EvaluationLog(out / "eval").records()
    n = np.arange(9)
    labels = image_labels(0, n, 4, "balanced")
    samples = sample_images(pipe, labels, image_seeds(0, n), 8, num_inference_steps=2)
    assert record["step"] == 8 and record["frechet_distance"] == pytest.approx(
        ImageMetric("digits")(samples, labels)["frechet_distance"], rel=1e-6)
    shutil.rmtree(out)
