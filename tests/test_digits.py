"""The bundled digits model: the shipped folder (size, safetensors only), loading, and that its samples show the
requested digits, judged by a classifier trained here on the real train split (benchmarks/eval_digits.py measures
more)."""

from __future__ import annotations

import json

import pytest
import torch

from sphere_ar_hf import SphereARPipeline
from sphere_ar_hf.evaluation import feature_statistics, frechet_distance
from sphere_ar_hf.evaluation.digits import (
    DIGITS_ID2LABEL,
    DigitClassifier,
    generate_digits,
    load_digit_splits,
    upscale_digits,
)
from sphere_ar_hf.pretrained import BUNDLED_MODELS, bundled_model_path

MAX_BYTES = 15 * 2**20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".npz")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> SphereARPipeline:
    pipe = SphereARPipeline.from_pretrained(bundled_model_path("digits"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def splits():
    return load_digit_splits()


@pytest.fixture(scope="module")
def classifier(splits, pipe) -> DigitClassifier:
    return DigitClassifier.fit_real(splits, size=pipe.vae.config.image_size)


def test_bundled_folder_is_small_and_safetensors_only():
    folder = bundled_model_path("digits")
    files = [f for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    names = {str(f.relative_to(folder)) for f in files}
    assert {"model_index.json", "transformer/config.json", "transformer/model.safetensors", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= names
    weights = [f for f in files if f.name.endswith(WEIGHT_SUFFIXES)]
    assert weights and all(f.suffix == ".safetensors" for f in weights), sorted(names)
    assert sum(f.stat().st_size for f in files) <= MAX_BYTES
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "SphereARPipeline"


def test_bundled_model_path_errors():
    assert "digits" in BUNDLED_MODELS
    with pytest.raises(ValueError, match="digits"):
        bundled_model_path("imagenet")


def test_bundled_pipeline_loads(pipe):
    config = pipe.transformer.config
    assert config.num_classes == 10 and pipe.id2label == DIGITS_ID2LABEL
    assert 1.0 <= config.guidance_scale <= 8.0
    assert pipe.get_label_ids(["0", 7, "9"]) == [0, 7, 9]
    assert pipe.vae.config.image_size == config.image_size
    latents = pipe([3], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.allclose(latents.norm(dim=-1), torch.full(latents.shape[:2], config.latent_dim ** 0.5), atol=1e-4)


def test_classifier_is_a_fair_judge(splits, classifier):
    size = classifier.size
    test_x = upscale_digits(splits.test_images, size)
    assert classifier.accuracy(test_x, splits.test_labels) >= 0.95
    train_f, test_f = classifier.features(upscale_digits(splits.train_images, size)), classifier.features(test_x)
    test_stats, train_stats = feature_statistics(test_f), feature_statistics(train_f)
    assert frechet_distance(*test_stats, *test_stats) == pytest.approx(0.0, abs=1e-4)  # float noise, traces of ~440
    assert frechet_distance(*train_stats, *test_stats) > 0


def test_samples_show_the_requested_digit(pipe, classifier):
    images, labels, _ = generate_digits(pipe, n_per_class=5, num_inference_steps=25, seed=0)
    assert images.shape == (50, pipe.vae.config.image_size, pipe.vae.config.image_size, 3)
    assert classifier.accuracy(images, labels) >= 0.8
