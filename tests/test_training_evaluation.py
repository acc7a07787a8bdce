"""Quality while it trains: the AR trainer's sample evaluation and the S-VAE trainer's reconstruction evaluation.

Tiny AR models over the bundled digits S-VAE (16 px, 4 tokens of 16 dims), the digits feature space, 16 images
and 4 sampler steps per evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, bundled_model_path
from sphere_ar_hf.evaluation.sampling import image_labels, sample_images
from sphere_ar_hf.seeding import image_seeds
from sphere_ar_hf.training.arguments import SphereARTrainingArguments
from sphere_ar_hf.training.evaluation_log import EvaluationLog, ImageMetric
from sphere_ar_hf.training.trainer import SphereARTrainer
from sphere_ar_hf.vae import SphereVAE

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS = bundled_model_path("digits")
TINY_AR = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_hidden_size=32, head_num_layers=1,
               head_num_adaln=1, image_size=16, patch_size=8, num_classes=10, num_class_tokens=2)
EVAL = dict(eval_images=16, eval_steps=2, eval_features="digits", eval_num_inference_steps=4,
            per_device_eval_batch_size=8)


class DigitTokens(torch.utils.data.Dataset):
    """The digits VAE's tokens of fixed random points on the sphere, labels ``i % 10``."""

    def __init__(self, n: int = 16):
        x = torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(0))
        self.latents = torch.nn.functional.normalize(x, dim=-1) * 4.0

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "class_labels": torch.tensor(i % 10)}


@pytest.fixture(scope="module")
def vae() -> SphereVAE:
    return SphereVAE.from_pretrained(str(DIGITS / "vae")).eval()


def make_trainer(tmp_path: Path, vae: SphereVAE, callbacks=(), **overrides) -> SphereARTrainer:
    kw = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
              warmup_steps=0, decay_start=0, logging_steps=2, save_strategy="steps", save_steps=4,
              report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, ema_decay=0.5, **EVAL)
    torch.manual_seed(0)
    model = SphereARTransformer(SphereARConfig(**TINY_AR))
    return SphereARTrainer(model=model, args=SphereARTrainingArguments(**{**kw, **overrides}), vae=vae,
                           train_dataset=DigitTokens(), callbacks=list(callbacks))


def steps(log_dir: Path) -> list[int]:
    return [r["step"] for r in EvaluationLog(log_dir).records()]


class Stop(RuntimeError):
    pass


class KillAt(TrainerCallback):
    """Raises at the end of ``step`` (after that step's evaluation: callbacks run in order), like a killed run."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Stop(f"killed at step {self.step}")


def test_evaluations_log_fd_and_grids_and_a_resumed_run_continues_the_curve(tmp_path, vae):
    trainer = make_trainer(tmp_path, vae)
    trainer.add_callback(KillAt(7))  # never reached: an uninterrupted run
    trainer.train()
    full = EvaluationLog(tmp_path / "run" / "eval").records()
    assert [r["step"] for r in full] == [2, 4, 6]
    for r in full:
        assert np.isfinite(r["frechet_distance"]) and r["frechet_distance"] > 0
        assert 0 <= r["accuracy"] <= 1 and r["settings"]["num_images"] == 16 and r["seconds"] > 0
        grid = Image.open(tmp_path / "run" / "eval" / r["grid"])
        assert grid.size == (4 * 18 + 2, 4 * 18 + 2)  # 16 images of 16 px, 4 x 4 with 2 px padding
    assert len({r["frechet_distance"] for r in full}) == 3  # the model changes between evaluations

    # killed after step 6's evaluation, before a checkpoint at 8 (the last one is 4): resume from 4
    other = tmp_path / "killed"
    trainer = make_trainer(other, vae, max_steps=8)
    trainer.add_callback(KillAt(6))
    with pytest.raises(Stop):
        trainer.train()
    assert steps(other / "run" / "eval") == [2, 4, 6]
    killed_six = EvaluationLog(other / "run" / "eval").records()[2]
    trainer = make_trainer(other, vae, max_steps=8)
    trainer.train(resume_from_checkpoint="latest")
    records = EvaluationLog(other / "run" / "eval").records()
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # no duplicate, no gap
    assert records[2]["frechet_distance"] == pytest.approx(killed_six["frechet_distance"], rel=1e-6)
    assert sorted(p.name for p in (other / "run" / "eval").glob("*.png")) == [
        f"step-{s:08d}.png" for s in (2, 4, 6, 8)]
    # the same run uninterrupted has the same curve up to step 6 (same data, seeds and weights)
    assert [r["frechet_distance"] for r in records[:2]] == pytest.approx([r["frechet_distance"] for r in full[:2]],
                                                                       rel=1e-6)


def test_the_evaluation_samples_with_the_ema_weights_and_leaves_the_raw_ones(tmp_path, vae):
    trainer = make_trainer(tmp_path, vae, max_steps=2, eval_steps=2, save_strategy="no")
    trainer.train()
    record = EvaluationLog(tmp_path / "run" / "eval").records()[-1]
    model = trainer.model  # EMA weights were copied into it at the end of training (copy_to_model_on_train_end)
    pipe = SphereARPipeline(transformer=model.eval(), vae=vae, scheduler=SphereARScheduler())
    pipe.set_progress_bar_config(disable=True)
    n = np.arange(16)
    labels = image_labels(0, n, 10, "balanced")
    images = sample_images(pipe, labels, image_seeds(0, n), 8, num_inference_steps=4)
    metric = ImageMetric("digits")
    assert metric(images, labels)["frechet_distance"] == pytest.approx(record["frechet_distance"], rel=1e-6)


def test_averaged_weights_swap_in_and_back_bit_for_bit():
    from sphere_ar_hf.training.ema import ParameterEMA

    model = torch.nn.Linear(3, 2)
    ema = ParameterEMA(model, decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    raw = [p.detach().clone() for p in model.parameters()]
    with ema.averaged_weights():
        for p, b in zip(model.parameters(), before):
            torch.testing.assert_close(p, b + 0.5)
    for p, r in zip(model.parameters(), raw):
        assert torch.equal(p, r)


@pytest.mark.parametrize("overrides, message", [
    (dict(eval_images=1), "--eval_images: must be 0 (off) or at least 2"),
    (dict(eval_steps=None), "--eval_images 16 needs --eval_steps N"),
    (dict(eval_features="inception"), "eval_reference is required"),
    (dict(eval_features="inception", eval_reference="/nonexistent/ref.npz"), "/nonexistent/ref.npz: no such file"),
])
def test_bad_evaluation_arguments_are_one_line_errors(tmp_path, vae, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        make_trainer(tmp_path, vae, **overrides)
    assert "\n" not in str(e.value)


def test_evaluation_log_keeps_until_a_step_and_replaces_a_step(tmp_path):
    log = EvaluationLog(tmp_path)
    image = np.zeros((4, 8, 8, 3), np.uint8)
    for step in (10, 20, 30):
        log.append({"step": step, "fd": float(step)}, image)
    log.keep_until(20)
    assert [r["step"] for r in log.records()] == [10, 20]
    assert not (tmp_path / "step-00000030.png").exists() and (tmp_path / "step-00000020.png").exists()
    log.append({"step": 20, "fd": 2.0})
    assert [(r["step"], r["fd"]) for r in log.records()] == [(10, 10.0), (20, 2.0)]
    assert not list(tmp_path.glob("*.tmp*")) and json.loads((tmp_path / "metrics.jsonl").read_text().split("\n")[0])
