"""S-VAE training: loss terms, LPIPS offline, PatchGAN layout, checkpoints, and the example script end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VAE_SCRIPT, VAE_SCRIPT_ARGS, safetensors_weights
from sphere_ar_hf import SphereVAE
from sphere_ar_hf.training.checkpoints import CHECKPOINT_MARKER, mark_checkpoint_complete, resolve_resume_checkpoint
from sphere_ar_hf.training.data import DataArguments, build_image_dataset
from sphere_ar_hf.training.evaluation_log import EvaluationLog
from sphere_ar_hf.training.losses import (
    PatchGANDiscriminator,
    PerceptualLoss,
    SphereVAELoss,
    adversarial_weight,
    hinge_d_loss,
    hinge_gen_loss,
    non_saturating_d_loss,
    non_saturating_gen_loss,
    vanilla_d_loss,
)
from sphere_ar_hf.training.optimization import official_param_groups
from sphere_ar_hf.training.reconstruction_evaluation import ReconstructionEvaluation
from sphere_ar_hf.training.schedules import official_learning_rate as lr_at
from sphere_ar_hf.training.vae_arguments import VAEModelArguments, VAETrainingArguments
from sphere_ar_hf.training.vae_checkpoints import save_checkpoint_atomically
from sphere_ar_hf.training.vae_models import VAEWithPosterior, build_vae

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = VAE_SCRIPT
TINY_VAE = dict(latent_dim=16, image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64),
                encoder_layers=1, decoder_layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lpips_random() -> PerceptualLoss:
    return PerceptualLoss(pretrained_backbone=False)


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


# ---------------------------------------------------------------------------------------------------------------
# loss terms


def test_adversarial_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: real terms relu(1 - r) = 0, 0.5, 2; fake terms relu(1 + f) = 0, 1, 2.5 -> 0.5 * (2.5/3 + 3.5/3) = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0)
    assert hinge_d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)).item() == 0.0
    assert hinge_gen_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    # BCE(real -> 1, fake -> 0) equals the logistic loss
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected)
    assert non_saturating_gen_loss(fake).item() == pytest.approx(sum(softplus(-f) for f in fake.tolist()) / 3)


class ConstantPerceptual(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().mean() * 0 + 0.25


class CountingDiscriminator(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value, self.calls = value, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x[:, :1] * 0 + self.value


def test_official_defaults_andsafetensors_weights():
    loss_fn = SphereVAELoss(perceptual=ConstantPerceptual())
    assert (loss_fn.reconstruction_weight, loss_fn.perceptual_weight, loss_fn.kl_weight) == (1.0, 1.0, 0.004)
    assert (loss_fn.disc_weight, loss_fn.disc_start) == (0.5, 20000)
    assert loss_fn.rec_loss is torch.nn.functional.l1_loss
    assert loss_fn.d_loss is hinge_d_loss and loss_fn.g_loss is hinge_gen_loss
    images, recon = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    out = loss_fn.generator_loss(images, recon, torch.tensor(3.0), step=1)
    assert out.reconstruction.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(0.5 + 0.25 + 0.004 * 3.0)
    # the KL enters with weight 0.004
    out2 = loss_fn.generator_loss(images, recon, torch.tensor(13.0), step=1)
    assert (out2.loss - out.loss).item() == pytest.approx(0.004 * 10.0, rel=1e-5)
    l2 = SphereVAELoss(reconstruction_loss="l2", perceptual=ConstantPerceptual())
    assert l2.generator_loss(images, recon, torch.tensor(0.0), 1).reconstruction.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="disc_loss"):
        SphereVAELoss(disc_loss="wasserstein", perceptual=ConstantPerceptual())


def test_adversarial_term_off_before_disc_start_and_on_after():
    assert adversarial_weight(19999, 20000, 0.5) == 0.0
    assert adversarial_weight(20000, 20000, 0.5) == 0.5
    loss_fn = SphereVAELoss(perceptual=ConstantPerceptual(), disc_start=10)
    disc = CountingDiscriminator(value=2.0)
    images, recon = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    before = loss_fn.generator_loss(images, recon, torch.tensor(0.0), step=9, discriminator=disc)
    assert before.gen_adv.item() == 0.0 and before.adv_weight == 0.0
    assert disc.calls == 0  # not even run: its term would be multiplied by 0
    after = loss_fn.generator_loss(images, recon, torch.tensor(0.0), step=10, discriminator=disc)
    assert disc.calls == 1 and after.adv_weight == 0.5
    assert after.gen_adv.item() == pytest.approx(0.5 * -2.0)
    assert after.loss.item() == pytest.approx(before.loss.item() - 1.0)
    real, fake = torch.full((2, 1, 3, 3), 0.5), torch.full((2, 1, 3, 3), 0.5)
    assert loss_fn.discriminator_loss(real, fake, step=9).item() == 0.0
    assert loss_fn.discriminator_loss(real, fake, step=10).item() == pytest.approx(0.5 * hinge_d_loss(real, fake))
    with pytest.raises(ValueError, match="discriminator"):
        loss_fn.generator_loss(images, recon, torch.tensor(0.0), step=10)


def test_lpips_runs_offline_with_random_backbone(lpips_random, monkeypatch):
    import lpips

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    fresh = PerceptualLoss(pretrained_backbone=False, use_dropout=False)  # builds with downloads forbidden
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu")
    assert len(shipped) == 5
    for module in (fresh, lpips_random):  # the linear layers are the package's, with and without dropout
        state = module.lpips.state_dict()
        for key, value in shipped.items():
            assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in lpips_random.parameters())

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    lpips_random.eval()
    assert lpips_random(x, x).item() == 0.0
    assert lpips_random(x, y).item() > 0.0
    y.requires_grad_(True)
    lpips_random(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # official behaviour: the loss module is in training mode, so LPIPS's dropout is active
    lpips_random.train()
    torch.manual_seed(0)
    a, b = lpips_random(x, y.detach()), lpips_random(x, y.detach())
    lpips_random.eval()
    assert a.item() != b.item()
    assert lpips_random(x, x).item() == 0.0


def test_lpips_without_vgg_weights_is_a_one_line_error(monkeypatch, tmp_path):
    """No VGG16 weights cached and none downloadable (the download is made to fail; nothing touches the
    network): a one-line error naming both ways out and where the weights go; offline it fails at once."""
    import urllib.error

    import torchvision.models._api as tv_api

    from sphere_ar_hf.training.losses import VGG16_FILE, VGGWeightsUnavailableError, vgg16_weights_path

    def refused(*args, **kwargs):
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refused)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refused)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / VGG16_FILE
    assert vgg16_weights_path() == expected
    with pytest.raises(VGGWeightsUnavailableError) as info:
        PerceptualLoss()
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, FileNotFoundError)  # run_main: "error: ..." and exit 2
    for needle in ("--lpips_random_backbone", "--perceptual_weight 0", str(expected), "Connection refused",
                   "https://download.pytorch.org/models/vgg16-397923af.pth"):
        assert needle in message, needle
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(VGGWeightsUnavailableError, match="HF_HUB_OFFLINE"):
        PerceptualLoss()


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


def test_patchgan_matches_official_layout():
    disc = PatchGANDiscriminator()
    state = disc.state_dict()
    convs = {"main.0.weight": (64, 3, 4, 4), "main.0.bias": (64,), "main.2.weight": (128, 64, 4, 4),
             "main.5.weight": (256, 128, 4, 4), "main.8.weight": (512, 256, 4, 4), "main.11.weight": (1, 512, 4, 4),
             "main.11.bias": (1,)}
    for key, shape in convs.items():
        assert tuple(state[key].shape) == shape
    for i, ch in ((3, 128), (6, 256), (9, 512)):
        assert tuple(state[f"main.{i}.weight"].shape) == (ch,) and f"main.{i}.running_mean" in state
    assert "main.2.bias" not in state  # convolutions followed by BatchNorm have no bias
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    with torch.no_grad():
        assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert abs(state["main.2.weight"].std().item() - 0.02) < 0.002  # N(0, 0.02) init
    assert torch.equal(state["main.3.bias"], torch.zeros(128))


def test_build_vae_is_a_bare_sphere_vae():
    """The official initialisation is SphereVAE's own: the trainer builds the VAE and adds nothing."""
    args = VAEModelArguments(latent_dim=16, patch_size=16, z_channels=64, cnn_channels=[32, 32, 32, 32, 64],
                             encoder_layers=1, decoder_layers=1)
    torch.manual_seed(0)
    built = build_vae(args, 32).state_dict()
    torch.manual_seed(0)
    bare = SphereVAE(**TINY_VAE).state_dict()
    assert built.keys() == bare.keys() and all(torch.equal(built[k], bare[k]) for k in built)
    assert built["encoder_vit.register_tokens"].abs().max() > 0  # not the zeros of the layer definition


def test_lr_schedule_and_weight_decay_groups():
    assert [lr_at(s, 100, 1e-4) for s in (0, 50, 99)] == [1e-4] * 3  # the S-VAE recipe: constant
    assert lr_at(5, 100, 1e-4, warmup_steps=10) == pytest.approx(5e-5)
    assert lr_at(20, 100, 1e-4, decay_start=20, min_lr=1e-5) == pytest.approx(1e-4)
    assert lr_at(100, 100, 1e-4, decay_start=20, min_lr=1e-5) == pytest.approx(1e-5)
    # past its end the schedule stays at min_lr (an unclamped cosine would rise again)
    assert [lr_at(s, 100, 1e-4, decay_start=20, min_lr=1e-5) for s in (101, 150, 180)] == [1e-5] * 3
    # the official create_optimizer on the S-VAE and the PatchGAN: decay exactly the >= 2-d trainable tensors
    # (neither declares non_decay_keys; the VAE's register tokens are 2-d, as the official nn.Embedding)
    vae = VAEWithPosterior(SphereVAE(**TINY_VAE))
    vae.vae.decoder_norm_out.weight.requires_grad_(False)  # frozen parameters are in no group
    for model in (PatchGANDiscriminator(base_channels=8), vae):
        groups = official_param_groups(model, 0.05)
        assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert [id(p) for p in groups[0]["params"]] == [id(p) for p in trainable if p.dim() >= 2]
        assert [id(p) for p in groups[1]["params"]] == [id(p) for p in trainable if p.dim() < 2]
    assert any(p is vae.vae.encoder_vit.register_tokens for p in official_param_groups(vae, 0.05)[0]["params"])


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _complete(path: Path, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x")
    mark_checkpoint_complete(path, step)
    return path


class FakeAccelerator:
    is_main_process = True

    def __init__(self, fail: bool):
        self.fail = fail

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        if self.fail:
            raise KeyboardInterrupt("killed while writing the optimizer state")
        (Path(output_dir) / "optimizer.bin").write_bytes(b"y")


def test_latest_never_picks_a_half_written_checkpoint(tmp_path):
    assert resolve_resume_checkpoint(tmp_path / "missing", "latest") is None
    good = _complete(tmp_path / "checkpoint-20", 20)
    _complete(tmp_path / "checkpoint-3", 3)
    (tmp_path / "checkpoint-30").mkdir()  # e.g. copied by hand, never completed
    (tmp_path / "checkpoint-30" / "model.safetensors").write_bytes(b"partial")
    assert resolve_resume_checkpoint(tmp_path, "latest") == str(good)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomically(FakeAccelerator(fail=True), tmp_path, 40)
    assert not (tmp_path / "checkpoint-40").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # the error left no staging folder
    assert resolve_resume_checkpoint(tmp_path, "latest") == str(good)
    # a staging folder that a killed run left is replaced, not written into
    (tmp_path / ".checkpoint-40.tmp-shared").mkdir()
    (tmp_path / ".checkpoint-40.tmp-shared" / "stale.bin").write_bytes(b"old")
    final = save_checkpoint_atomically(FakeAccelerator(fail=False), tmp_path, 40, total_limit=2)
    assert final == tmp_path / "checkpoint-40" and resolve_resume_checkpoint(tmp_path, "latest") == str(final)
    assert sorted(p.name for p in final.iterdir()) == [CHECKPOINT_MARKER, "model.safetensors", "optimizer.bin"]
    assert not (tmp_path / "checkpoint-3").exists() and good.exists()  # total_limit keeps the newest 2
    # saving the same step again swaps the new folder in and leaves nothing beside it
    (final / "optimizer.bin").write_bytes(b"previous")
    assert save_checkpoint_atomically(FakeAccelerator(fail=False), tmp_path, 40) == final
    assert (final / "optimizer.bin").read_bytes() == b"y"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


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
