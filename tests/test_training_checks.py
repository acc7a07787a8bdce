"""A training run never starts on arguments that cannot give a working model: every numeric flag of the trainers is
range-checked before any work (one line naming the flag), inputs that do not exist or are not JSON objects are
named, a column that holds no images fails, and a diverged model is never saved."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import launch_env, torchrun_command
from sphere_ar_hf.loading import refuse_non_finite
from sphere_ar_hf.training.argument_checks import check_input_path
from sphere_ar_hf.training.data import probe_images

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refused(name: str, argv: list[str], *needles: str) -> None:
    with pytest.raises(ValueError) as info:
        example(name).main(argv)
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message


VAE = ["--output_dir", "runs/never", "--dataset_path", "no-data"]
AR = ["--output_dir", "runs/never", "--pretrained_vae", "no-vae", "--dataset_path", "no-data"]
LORA = ["--output_dir", "runs/never", "--pretrained_model", "no-model", "--dataset_path", "no-data"]


@pytest.mark.parametrize(("name", "argv", "needles"), [
    ("train_vae", [*VAE, "--num_train_epochs", "0"], ("--num_train_epochs 0", "(0, inf)")),
    ("train_vae", [*VAE, "--global_batch_size", "0"], ("--global_batch_size 0",)),
    ("train_vae", [*VAE, "--resolution", "0"], ("--resolution 0",)),
    ("train_vae", [*VAE, "--cnn_channels", "0", "8"], ("--cnn_channels [0, 8]",)),
    ("train_vae", [*VAE, "--gradient_accumulation_steps", "0"], ("--gradient_accumulation_steps 0",)),
    ("train_vae", [*VAE, "--checkpointing_steps", "0"], ("--checkpointing_steps 0",)),
    ("train_vae", [*VAE, "--kl_weight", "-1"], ("--kl_weight -1.0", "[0, inf)")),
    ("train_vae", [*VAE, "--learning_rate", "inf"], ("--learning_rate inf",)),
    ("train_vae", [*VAE, "--vae_config", "missing.json"], ("--vae_config missing.json: no such file",)),
    ("train_sphere_ar", [*AR, "--num_train_epochs", "-1"], ("--num_train_epochs -1.0", "(0, inf)")),
    ("train_sphere_ar", [*AR, "--class_dropout_prob", "2"], ("--class_dropout_prob 2.0", "[0, 1]")),
    ("train_sphere_ar", [*AR, "--ema_decay", "nan"], ("--ema_decay nan", "finite number <= 1")),
    ("train_sphere_ar", [*AR, "--diff_batch_mul", "0"], ("--diff_batch_mul 0",)),
    ("train_sphere_ar", [*AR, "--per_device_train_batch_size", "0"], ("--per_device_train_batch_size 0",)),
    ("train_sphere_ar", ["--output_dir", "runs/never", "--pretrained_vae", "./no/such/vae", "--dataset_path", "d"],
     ("--pretrained_vae ./no/such/vae: no such file or folder",)),
    ("train_sphere_ar", [*AR, "--config_file", "missing.json"], ("--config_file missing.json: no such file",)),
    ("train_lora", [*LORA, "--lora_alpha", "nan"], ("--lora_alpha nan", "(0, inf)")),
    ("train_lora", [*LORA, "--lora_rank", "0"], ("--lora_rank 0",)),
])
def test_trainer_flags_are_checked_before_any_work(tmp_path, monkeypatch, name, argv, needles) -> None:
    monkeypatch.chdir(tmp_path)
    refused(name, argv, *needles)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(("argv", "needles"), [
    (["--threads", "0"], ("--threads 0",)),
    (["--vae_epochs", "0"], ("--vae_epochs 0",)),
    (["--vae_lr", "inf"], ("--vae_lr inf",)),
    (["--ema_decay", "nan"], ("--ema_decay nan",)),
    (["--heads", "0"], ("--heads: must be an integer from 1",)),
    (["--num_class_tokens", "0"], ("--num_class_tokens: must be an integer from 1",)),
    (["--diff_batch_mul", "0"], ("--diff_batch_mul: must be an integer from 1",)),
    (["--eval_images", "1"], ("--eval_images 1: expected 0 (off) or at least 2",)),
    (["--eval_images", "-3"], ("--eval_images -3",)),
    (["--eval_images", "50", "--ar_eval_steps", "0"], ("--ar_eval_steps 0",)),
])
def test_the_digits_recipe_refuses_bad_flags_before_the_svae_stage(tmp_path, monkeypatch, argv, needles) -> None:
    monkeypatch.chdir(tmp_path)
    refused("train_digits", [*argv, "--output_dir", "out", "--work_dir", "work"], *needles)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_the_digits_recipe_evaluations_need_a_work_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    refused("train_digits", ["--eval_images", "50", "--output_dir", "out"], "--eval_images 50 needs --work_dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "argv", "needles"), [
    ("train_vae", [*VAE, "--eval_images", "-1"], ("--eval_images -1",)),
    ("train_sphere_ar", [*AR, "--eval_images", "-1"], ("--eval_images -1",)),
    ("train_sphere_ar", [*AR, "--eval_num_inference_steps", "0"], ("--eval_num_inference_steps 0",)),
])
def test_evaluation_flags_are_checked_before_any_work(tmp_path, monkeypatch, name, argv, needles) -> None:
    monkeypatch.chdir(tmp_path)
    refused(name, argv, *needles)


def test_config_files_must_be_json_objects(tmp_path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="--config_file .*bad.json: not a readable JSON file"):
        check_input_path("--config_file", tmp_path / "bad.json")
    with pytest.raises(ValueError, match="--config_file .*list.json: expected a JSON object"):
        check_input_path("--config_file", tmp_path / "list.json")
    check_input_path("--pretrained_vae", "owner/repo")  # may be a Hub repository: left to the loader
    (tmp_path / "ok.json").write_text(json.dumps({"hidden_size": 64}))
    check_input_path("--config_file", tmp_path / "ok.json")


def test_a_column_without_images_fails(tmp_path) -> None:
    import datasets
    import numpy as np
    from PIL import Image

    labels = datasets.Dataset.from_dict({"image": [0, 1, 2], "label": [0, 1, 2]})
    with pytest.raises(ValueError, match="--image_column 'image': none of the first 3 examples holds a decodable"):
        probe_images(labels, "image")
    one_bad = datasets.Dataset.from_dict({"image": [b"broken", Image.fromarray(np.zeros((4, 4, 3), np.uint8))]},
                                         features=datasets.Features({"image": datasets.Image()}))
    probe_images(one_bad.cast_column("image", datasets.Image(decode=False)), "image")  # a bad file is skipped


def test_a_diverged_model_is_never_saved() -> None:
    model = torch.nn.Linear(2, 2)
    refuse_non_finite(model, "transformer")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"training diverged: 1 weights of the transformer are NaN or infinite "
                                         r"\(weight\); nothing was saved"):
        refuse_non_finite(model, "transformer")


@pytest.mark.parametrize(("name", "argv", "option"), [
    ("train_vae", VAE, "ACCELERATE_USE_CPU=true"),
    ("cache_latents", ["--pretrained_vae", "no-vae", "--dataset_path", "no-data", "--output_dir", "runs/never"],
     "--cpu"),
    ("train_sphere_ar", AR, "--use_cpu"),
])
def test_processes_that_would_each_run_alone_are_refused(tmp_path, name, argv, option) -> None:
    """``torchrun`` of two processes on a machine without GPUs, without the script's CPU option: accelerate and the
    Trainer would run each process alone (all the data, no gradient exchange, the same files written twice). Every
    script refuses in one line on each process, before any work."""
    env = launch_env("ACCELERATE_USE_CPU", CUDA_VISIBLE_DEVICES="")  # no GPU, also on a GPU machine
    (tmp_path / "no-data").mkdir()
    cmd = torchrun_command(ROOT / "examples" / f"{name}.py", *argv)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    # the two processes share stderr, so their lines may interleave: count the messages, not the lines
    assert res.returncode != 0 and res.stderr.count("error: WORLD_SIZE=2: ") == 2, res.stderr[-3000:]
    assert res.stderr.count(f"pass {option} (or set ACCELERATE_USE_CPU=true)") == 2, res.stderr[-3000:]
    assert not (tmp_path / "runs").exists()
