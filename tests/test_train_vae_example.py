"""The S-VAE example script (examples/train_vae.py) end to end, in this process: --help lists every option with
the official recipe's defaults, missing VGG weights are one line, training reduces the reconstruction loss, a resume
with more steps follows the new schedule and keeps few checkpoints, a resume equals the uninterrupted run, and a
resume unpickles no code. The loss terms, LPIPS, the PatchGAN and the checkpoint folders are tested in
test_train_vae.py; two processes in test_train_vae_processes.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VAE_SCRIPT, VAE_SCRIPT_ARGS, safetensors_weights
from sphere_ar_hf import SphereVAE
from sphere_ar_hf.training.checkpoints import CHECKPOINT_MARKER, mark_checkpoint_complete
from sphere_ar_hf.training.data import DataArguments, build_image_dataset
from sphere_ar_hf.training.evaluation_log import EvaluationLog
from sphere_ar_hf.training.losses import PatchGANDiscriminator
from sphere_ar_hf.training.reconstruction_evaluation import ReconstructionEvaluation
from sphere_ar_hf.training.schedules import official_learning_rate as lr_at
from sphere_ar_hf.training.vae_arguments import VAEModelArguments, VAETrainingArguments

EXAMPLE = VAE_SCRIPT

pytestmark = pytest.mark.usefixtures("one_thread")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def example():
    """``examples/train_vae.py`` as a module; accelerate's process-wide state is reset around each test so that
    in-process runs neither inherit nor leak settings (e.g. mixed precision) from/to other tests."""
    spec = importlib.util.spec_from_file_location("train_vae_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _reset_accelerate()
    yield module
    _reset_accelerate()


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return [values[k] for k in sorted(values)]


def test_example_reports_missing_vgg_weights_in_one_line(example, image_dataset, tmp_path, monkeypatch, capsys):
    from sphere_ar_hf.utils import run_main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["--output_dir", str(tmp_path / "run"), "--dataset_path", str(image_dataset),
            *[a for a in VAE_SCRIPT_ARGS if a != "--lpips_random_backbone"], "--max_train_steps", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(example.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in err
    assert "--lpips_random_backbone" in errors[0] and "--perceptual_weight 0" in errors[0]


# ---------------------------------------------------------------------------------------------------------------
# the example script end to end


def test_help_lists_every_option(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for cls in (VAEModelArguments, VAETrainingArguments, DataArguments):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out, f.name
    flat = " ".join(out.split())  # help lines wrap with the terminal width
    assert "(official: 0.004)" in flat and "official: 20000" in out and "{hinge,vanilla,non-saturating}" in out
    # the defaults are the official S-VAE recipe
    model_args, train_args, data_args = example.parse_args(["--output_dir", "x", "--dataset_name", "d"])
    assert (train_args.learning_rate, train_args.adam_beta1, train_args.adam_beta2) == (1e-4, 0.9, 0.95)
    assert (train_args.weight_decay, train_args.max_grad_norm, train_args.global_batch_size) == (0.05, 1.0, 256)
    # mixed precision: bf16 (official) where the GPU has native bf16 ("auto"; tests/test_gpu_traps.py)
    assert (train_args.num_train_epochs, train_args.mixed_precision, train_args.disc_start) == (100, "auto", 20000)
    assert (train_args.kl_weight, train_args.disc_weight, train_args.reconstruction_loss) == (None, 0.5, "l1")
    assert data_args.resolution == 256 and model_args.latent_dim is None  # None: the SphereVAE default (16)


def test_training_reduces_reconstruction_loss(example, image_dataset, tmp_path):
    """The official lr (1e-4), KL weight etc.; LPIPS off (with a random backbone it is meaningless and it would
    dominate the CPU time). Measured: L1 0.50 -> ~0.22 after 30 steps (mostly the images' statistics: this early,
    the posterior (kappa ~1.7 in 16 dims) carries little information)."""
    run = tmp_path / "run"
    example.main(["--output_dir", str(run), "--dataset_path", str(image_dataset), *VAE_SCRIPT_ARGS,
                  "--global_batch_size", "8", "--max_train_steps", "30", "--perceptual_weight", "0",
                  "--logging_steps", "1", "--checkpointing_steps", "1000", "--validation_steps", "1000",
                  "--num_validation_images", "4"])
    rec = scalars(run, "train/recon_loss")
    assert len(rec) == 30
    first, last = np.mean(rec[:3]), np.mean(rec[-5:])
    assert last < 0.6 * first, (first, last, rec)
    assert (run / "previews" / "step_0000030.png").is_file()


def test_resume_with_more_steps_follows_the_new_schedule_and_keeps_few_checkpoints(example, image_dataset, tmp_path,
                                                                                    capsys, caplog):
    """4 steps of a 4-step schedule, then resume with --max_train_steps 8: steps 5..8 log the lr of a fresh 8-step
    schedule, never above the peak. Checkpoints every step: the default limit keeps the newest 3. The run shows
    a progress bar with ETA and a startup summary, and gives no num_classes warning."""
    lr, min_lr = 1e-3, 1e-5
    common = [*[a for a in VAE_SCRIPT_ARGS if a not in ("--num_classes", "4")], "--dataset_path", str(image_dataset),
              "--max_train_samples", "16", "--global_batch_size", "4", "--perceptual_weight", "0",
              "--learning_rate", str(lr), "--min_lr", str(min_lr), "--lr_warmup_steps", "2", "--lr_decay_start", "2",
              "--logging_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "1000",
              "--num_validation_images", "0", "--eval_steps", "2", "--eval_images", "8", "--eval_features", "digits"]
    assert "--num_classes" not in common
    run = tmp_path / "run"
    example.main(["--output_dir", str(run), "--max_train_steps", "4", *common])
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    capsys.readouterr()
    _reset_accelerate()
    with caplog.at_level(logging.INFO):
        example.main(["--output_dir", str(run), "--max_train_steps", "8", "--resume_from_checkpoint", "latest",
                      *common])
    err = capsys.readouterr().err
    lrs = scalars(run, "train/lr")
    assert len(lrs) == 8
    for step in range(5, 9):
        assert lrs[step - 1] == pytest.approx(lr_at(step - 1, 8, lr, min_lr, 2, 2), rel=1e-6), step
    assert max(lrs) <= lr * (1 + 1e-6)  # tensorboard stores float32
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7", "checkpoint-8"]
    assert err.count("S-VAE training") == 1 and "resuming at step 4" in err
    assert "4 per device x 1 process x 1 accumulation = 4 per step" in err and "16 images at 32px" in err
    assert "8/8 [" in err and "S-VAE:" in err  # tqdm: steps done / total [elapsed<remaining]
    assert not [r for r in caplog.records if "num_classes" in r.getMessage() and r.levelno >= logging.WARNING]
    assert str(run / "logs") in err and list((run / "logs").rglob("events.out.tfevents.*"))
    # the reconstruction evaluation: every 2 steps over both runs, in TensorBoard and eval/; the last record is
    # the saved S-VAE's reconstruction FD of the first 8 images
    records = EvaluationLog(run / "eval").records()
    assert [r["step"] for r in records] == [2, 4, 6, 8] and len(scalars(run, "eval/frechet_distance")) == 4
    assert all((run / "eval" / r["grid"]).is_file() and r["num_images"] == 8 for r in records)
    _reset_accelerate()
    dataset = build_image_dataset(DataArguments(dataset_path=str(image_dataset), resolution=32, max_train_samples=16),
                                  seed=0)
    evaluation = ReconstructionEvaluation(dataset, 8, "digits", tmp_path / "again")
    final = SphereVAE.from_pretrained(str(run / "vae"))
    record, _ = evaluation(final, 8, 2)
    assert record["frechet_distance"] == pytest.approx(records[-1]["frechet_distance"], rel=1e-5)


def test_resume_equals_uninterrupted_run(example, image_dataset, tmp_path):
    """2N steps == N steps + resume for N, with the whole objective (LPIPS with dropout, adversarial terms on from
    step 2, gradient accumulation), a resume in the middle of an epoch and an epoch boundary after it."""
    common = [*VAE_SCRIPT_ARGS, "--dataset_path", str(image_dataset), "--max_train_samples", "16",
              "--global_batch_size", "4", "--gradient_accumulation_steps", "2", "--disc_start", "2",
              "--learning_rate", "1e-3", "--logging_steps", "1", "--validation_steps", "3",
              "--num_validation_images", "2"]
    full, split = tmp_path / "full", tmp_path / "split"
    example.main(["--output_dir", str(full), "--max_train_steps", "6", "--checkpointing_steps", "100", *common])
    example.main(["--output_dir", str(split), "--max_train_steps", "3", "--checkpointing_steps", "100", *common])
    # a newer checkpoint whose save never finished must be ignored by "latest"
    broken = split / "checkpoint-5"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"truncated")
    vae_dir = example.main(["--output_dir", str(split), "--max_train_steps", "6", "--checkpointing_steps", "100",
                            "--resume_from_checkpoint", "latest", *common])
    assert json.loads((split / "checkpoint-6" / CHECKPOINT_MARKER).read_text())["global_step"] == 6

    for name in ("vae", "discriminator", "checkpoint-6"):
        a, b = safetensors_weights(full / name), safetensors_weights(split / name)
        assert a.keys() == b.keys() and a
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        assert worst <= 1e-6, (name, worst)
    opt_a = torch.load(full / "checkpoint-6" / "optimizer.bin", weights_only=False)["state"]
    opt_b = torch.load(split / "checkpoint-6" / "optimizer.bin", weights_only=False)["state"]
    for i in opt_a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(opt_a[i][key], opt_b[i][key], rtol=0, atol=1e-6)
    # the logged losses after the resume continue the uninterrupted run's
    assert np.allclose(scalars(full, "train/loss")[3:], scalars(split, "train/loss")[3:], rtol=0, atol=1e-6)
    assert scalars(full, "train/disc_loss")[0] == 0.0 and scalars(full, "train/disc_loss")[-1] > 0.0

    assert vae_dir == split / "vae"
    assert sorted(p.name for p in (split / "previews").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    from PIL import Image

    with Image.open(split / "previews" / "step_0000006.png") as im:
        assert im.format == "PNG" and im.size == (2 + 2 * 34, 2 + 2 * 34)  # 2 images x 2 rows (input / recon)
        grid = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert np.abs(grid[2:34] - grid[36:68]).mean() > 1.0  # the reconstructions are not the inputs
    vae = SphereVAE.from_pretrained(str(vae_dir))
    assert vae.config.image_size == 32 and vae.config.z_channels == 64
    with torch.no_grad():
        out = vae(torch.zeros(1, 3, 32, 32), sample_posterior=False).sample
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
    assert PatchGANDiscriminator.from_pretrained(str(split / "discriminator")).config.base_channels == 16


class _RunsCode:
    """Pickled, it calls ``os.mkdir(path)`` when loaded with ``weights_only=False``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_resume_unpickles_no_code(example, image_dataset, tmp_path):
    """The run's position travels as JSON in the checkpoint marker, not as an object accelerate unpickles with
    ``weights_only=False``. A checkpoint of the earlier format (the position in ``custom_checkpoint_0.pkl``)
    resumes to the same weights; one whose pickle would run code is refused in one line, and the code never runs."""
    common = [*VAE_SCRIPT_ARGS, "--dataset_path", str(image_dataset), "--max_train_samples", "16",
              "--global_batch_size", "4", "--gradient_accumulation_steps", "2", "--perceptual_weight", "0",
              "--learning_rate", "1e-3",
              "--logging_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "100",
              "--num_validation_images", "0", "--max_train_steps", "2"]
    run = tmp_path / "run"
    example.main(["--output_dir", str(run), *common])
    marker = json.loads((run / "checkpoint-1" / CHECKPOINT_MARKER).read_text())
    assert marker["train_state"] == {"global_step": 1, "epoch": 0, "micro_batches_in_epoch": 2,
                                     "global_batch_size": 4, "num_processes": 1, "gradient_accumulation_steps": 2}
    assert not list(run.rglob("custom_checkpoint_*"))

    legacy = tmp_path / "legacy" / "checkpoint-1"
    shutil.copytree(run / "checkpoint-1", legacy)
    torch.save(marker["train_state"], legacy / "custom_checkpoint_0.pkl")  # what accelerate wrote
    (legacy / CHECKPOINT_MARKER).unlink()
    mark_checkpoint_complete(legacy, 1, {"epoch": 0})
    _reset_accelerate()
    example.main(["--output_dir", str(legacy.parent), "--resume_from_checkpoint", "latest", *common])
    a, b = safetensors_weights(run / "vae"), safetensors_weights(legacy.parent / "vae")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.name for p in legacy.iterdir()} == {p.name for p in (run / "checkpoint-1").iterdir()} | {
        "custom_checkpoint_0.pkl"}  # untouched: no link folder left inside

    evil = tmp_path / "evil" / "checkpoint-1"
    shutil.copytree(legacy, evil)
    flag = tmp_path / "code-ran"
    torch.save(_RunsCode(flag), evil / "custom_checkpoint_0.pkl")
    (evil / CHECKPOINT_MARKER).unlink()
    mark_checkpoint_complete(evil, 1, {"epoch": 0})
    _reset_accelerate()
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl: the run's position could not be read") as e:
        example.main(["--output_dir", str(evil.parent), "--resume_from_checkpoint", "latest", *common])
    assert "\n" not in str(e.value) and not flag.exists() and not (evil.parent / "vae").exists()
