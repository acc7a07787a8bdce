"""S-VAE training, the library: the loss terms, LPIPS offline (and a one-line error without the VGG weights), the
PatchGAN's layout, the bare S-VAE the trainer builds, the LR schedule and weight-decay groups, and checkpoint folders
that "latest" never picks half written. The example script end to end is in test_train_vae_example.py."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from sphere_ar_hf import SphereVAE
from sphere_ar_hf.training.checkpoints import CHECKPOINT_MARKER, mark_checkpoint_complete, resolve_resume_checkpoint
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
from sphere_ar_hf.training.schedules import official_learning_rate as lr_at
from sphere_ar_hf.training.vae_arguments import VAEModelArguments
from sphere_ar_hf.training.vae_checkpoints import save_checkpoint_atomically
from sphere_ar_hf.training.vae_models import VAEWithPosterior, build_vae

TINY_VAE = dict(latent_dim=16, image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64),
                encoder_layers=1, decoder_layers=1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lpips_random() -> PerceptualLoss:
    return PerceptualLoss(pretrained_backbone=False)


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
