"""Traps of the training code that only a GPU or cluster run would hit, reached on the CPU by emulation: the
bf16 default, graph breaks under torch.compile, the latent cache's per-process shards, the process-group
timeout, RMSNorm under autocast, per-step host reads in the S-VAE trainer's logging, EMA with sharded params."""

from __future__ import annotations

import json
import shutil
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

from sphere_ar_hf import SphereARConfig, SphereARTransformer, SphereVAE
from sphere_ar_hf.layers import RMSNorm
from sphere_ar_hf.scheduling_sphere_ar import flow_path
from sphere_ar_hf.training import latent_cache
from sphere_ar_hf.training.arguments import SphereARTrainingArguments
from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.device_setup import check_ema_supported, resolve_mixed_precision
from sphere_ar_hf.training.trainer import SphereARTrainer
from sphere_ar_hf.training.vae_trainer import LogMeter, VAEModelArguments, VAETrainingArguments, train_vae

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_AR, TINY_VAE, sphere_tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate's process-wide state is reset around each test: a faked GPU must not leak into other tests."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    """A CUDA GPU of ``capability`` as torch reports it: bf16 'supported' everywhere (emulated below 8.0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or capability[0] >= 8)


def tiny_transformer(seed: int = 0) -> SphereARTransformer:
    torch.manual_seed(seed)
    return SphereARTransformer(SphereARConfig(**TINY_AR))


# ---------------------------------------------------------------------------------------------------------------
# 1. fp16 / bf16


@pytest.mark.parametrize("capability, native", [((8, 0), True), ((7, 0), False), ((7, 5), False)])
def test_bf16_defaults_to_native_bf16_gpus_and_yields_to_fp16(monkeypatch, tmp_path, capability, native):
    fake_cuda(monkeypatch, capability)

    def args(**kw) -> SphereARTrainingArguments:
        return SphereARTrainingArguments(output_dir=str(tmp_path), report_to="none", **kw)

    default = args()
    assert (default.bf16, default.fp16) == (native, False)  # V100 / T4: no slow emulated bf16 by default
    fp16 = args(fp16=True)  # on an A100 this raised "At most one of fp16 and bf16 can be True"
    assert (fp16.bf16, fp16.fp16) == (False, True)
    explicit = args(bf16=True)
    assert explicit.bf16 and not explicit.fp16
    assert not args(use_cpu=True).bf16
    # the S-VAE trainer's --mixed_precision auto (its default) follows the same rule; explicit values pass
    assert VAETrainingArguments(output_dir=str(tmp_path)).mixed_precision == "auto"
    assert resolve_mixed_precision("auto") == ("bf16" if native else "no")
    assert resolve_mixed_precision("bf16") == "bf16" and resolve_mixed_precision("no") == "no"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert resolve_mixed_precision("auto") == "no"


# ---------------------------------------------------------------------------------------------------------------
# 2. one graph under torch.compile


def reference_loss(model: SphereARTransformer, latents: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """The training loss as forward computed it before the draws moved out: label drop, then t, then noise, all
    drawn from ``generator`` inside the forward."""
    c = model.config
    labels = model.drop_labels(labels, generator)
    cond = model.compute_head_condition(latents, labels)
    z = cond.reshape(-1, cond.shape[-1]).repeat(c.diff_batch_mul, 1)
    target = latents.reshape(-1, c.latent_dim).float().repeat(c.diff_batch_mul, 1)
    t = torch.randn(target.shape[0], generator=generator).sigmoid()
    noise = torch.randn(target.shape, generator=generator)
    x_t, v_target = flow_path(target, noise, t)
    return F.mse_loss(model.head(x_t, t, z).float(), v_target)


def test_training_forward_is_one_graph_with_the_same_draws(tmp_path):
    model = tiny_transformer().train()
    latents, labels = sphere_tokens(3, model.config.num_image_tokens), torch.tensor([1, 2, 3])
    draws = model.draw_training_inputs(latents, labels, torch.Generator().manual_seed(0))
    assert sorted(draws) == ["label_drop_mask", "noise", "timesteps"]
    explained = torch._dynamo.explain(model)(latents=latents, class_labels=labels, **draws)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    # the same draws in the same order: the loss of the generator path, of the tensor path and of the old code
    expected = reference_loss(model, latents, labels, torch.Generator().manual_seed(7))
    loss = model(latents, labels, generator=torch.Generator().manual_seed(7)).loss
    g = torch.Generator().manual_seed(7)
    from_tensors = model(latents, labels, **model.draw_training_inputs(latents, labels, g)).loss
    assert torch.equal(loss, expected) and torch.equal(from_tensors, expected)
    # the trainer draws them and passes tensors, never the generator, into the (compiled) model
    args = SphereARTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", seed=3)
    trainer = SphereARTrainer(model=model, args=args)
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    loss = trainer.compute_loss(model, {"latents": latents, "class_labels": labels})
    assert seen == [["class_labels", "label_drop_mask", "latents", "noise", "timesteps"]]
    assert torch.equal(loss, reference_loss(model, latents, labels, torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------------------------------------------------------
# 3. latent cache shards, process-group timeout


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for c, cls in enumerate(["ant", "bee"]):
        (root / cls).mkdir()
        for k in range(3):
            Image.new("RGB", (40, 36), (40 * c + 10 * k, 90, 200)).save(root / cls / f"{k}.png")
    return root


def test_the_cache_is_the_processes_shard_files_never_gathered(images, tmp_path, monkeypatch):
    torch.manual_seed(0)
    vae = SphereVAE(**TINY_VAE).eval()
    data_args = DataArguments(train_data_dir=str(images), resolution=32, cache_dir=str(tmp_path / "hf"))

    def gathered(*args, **kwargs):
        raise AssertionError("a process read, concatenated or rewrote the whole cache")

    for name in ("concatenate_datasets", "load_from_disk"):
        monkeypatch.setattr(datasets, name, gathered)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", gathered)
    monkeypatch.setattr(datasets.Dataset, "from_file", gathered)
    out = latent_cache.cache_latents(vae, data_args, tmp_path / "cache", batch_size=4)
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("*.arrow")) == ["data-00000-of-00001.arrow"]  # the shard, in place
    ds = latent_cache.LatentCacheDataset(out, hflip=False, sample_posterior=False)
    assert len(ds) == 6 and latent_cache.check_latent_cache(str(out), vae)["num_examples"] == 6
    # a cache written by the earlier code (Dataset.save_to_disk of the concatenation) reads the same
    old = tmp_path / "old"
    datasets.load_from_disk(str(out)).save_to_disk(str(old))
    shutil.copy(out / latent_cache.CACHE_INFO_FILE, old / latent_cache.CACHE_INFO_FILE)
    old_ds = latent_cache.LatentCacheDataset(old, hflip=False, sample_posterior=False)
    assert all(torch.equal(old_ds[i]["latents"], ds[i]["latents"]) for i in range(6))
    # two processes: one file per process, listed in rank order (what the two-process test writes)
    for rank in range(2):
        shutil.copy(out / "data-00000-of-00001.arrow", tmp_path / latent_cache.shard_file_name(rank, 2))
    info = datasets.load_from_disk(str(out)).info
    latent_cache.write_shard_index(tmp_path, 2, info.features, info.description)
    assert json.loads((tmp_path / "state.json").read_text())["_data_files"] == [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]
    assert len(datasets.load_from_disk(str(tmp_path))) == 12


class AcceleratorCalled(Exception):
    pass


def capture_accelerator(monkeypatch) -> list[dict]:
    """Replace accelerate.Accelerator by a recorder that stops the run at its construction."""
    import accelerate

    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        raise AcceleratorCalled

    monkeypatch.setattr(accelerate, "Accelerator", record)
    return calls


def timeouts(call: dict) -> list[timedelta]:
    from accelerate import InitProcessGroupKwargs

    return [h.timeout for h in call.get("kwargs_handlers") or [] if isinstance(h, InitProcessGroupKwargs)]


def test_every_accelerator_gets_the_process_group_timeout(monkeypatch, tmp_path):
    calls = capture_accelerator(monkeypatch)
    cache_flags = ["--pretrained_vae", "v", "--output_dir", str(tmp_path / "c"), "--dataset_name", "d"]
    for extra in ([], ["--ddp_timeout", "600"]):
        with pytest.raises(AcceleratorCalled):
            latent_cache.main(cache_flags + extra)
    parser = HfArgumentParser((VAEModelArguments, VAETrainingArguments, DataArguments))
    fake_cuda(monkeypatch, (8, 0))
    for extra in ([], ["--ddp_timeout", "900"]):
        vae_args = parser.parse_args_into_dataclasses(
            args=["--output_dir", str(tmp_path / "v"), "--dataset_name", "d", *extra])
        with pytest.raises(AcceleratorCalled):
            train_vae(*vae_args)
    assert [timeouts(c) for c in calls] == [[timedelta(hours=2)], [timedelta(seconds=600)], [timedelta(hours=2)],
                                            [timedelta(seconds=900)]]
    assert calls[2]["mixed_precision"] == "bf16"  # --mixed_precision auto on a native-bf16 GPU
    # the AR trainer's TrainingArguments hand ddp_timeout to accelerate; its default is as long
    assert SphereARTrainingArguments(output_dir=str(tmp_path), use_cpu=True).ddp_timeout == 7200
    with pytest.raises(ValueError, match=r"--ddp_timeout 0: expected a positive number of seconds"):
        latent_cache.main(cache_flags + ["--ddp_timeout", "0"])


# ---------------------------------------------------------------------------------------------------------------
# 4. RMSNorm under autocast


def test_rms_norm_gets_matching_dtypes_under_bf16_autocast(monkeypatch):
    calls = []
    fused = F.rms_norm

    def spy(x, shape, weight=None, eps=None):
        calls.append((x.dtype, None if weight is None else weight.dtype))
        return fused(x, shape, weight, eps)

    torch.manual_seed(0)
    vae, model = SphereVAE(**TINY_VAE).eval(), tiny_transformer().train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = sphere_tokens(2, model.config.num_image_tokens)
    monkeypatch.setattr(F, "rms_norm", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        vae.decode(vae.encode(images).latent_dist.mode())
        model(latents, torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    norms = sum(isinstance(m, torch.nn.RMSNorm) for net in (vae, model) for m in net.modules())
    assert len(calls) >= norms > 0
    assert (torch.bfloat16, torch.bfloat16) in calls  # bf16 activations reach the norms ...
    assert all(x == w for x, w in calls), calls  # ... and always meet a weight of their dtype: the fused kernel
    monkeypatch.undo()
    # values: in float32 exactly nn.RMSNorm; under autocast the weight applied in bf16 (as LlamaRMSNorm)
    norm, plain = RMSNorm(16, eps=1e-6), torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        plain.weight.copy_(norm.weight)
    x = torch.randn(4, 16) * 3
    assert torch.equal(norm(x), plain(x)) and norm.state_dict().keys() == plain.state_dict().keys()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.rms_norm(x.bfloat16(), (16,), norm.weight.bfloat16(), 1e-6))
    torch.testing.assert_close(y.float(), plain(x), atol=5e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# 5. no per-step host reads in the S-VAE trainer's logging


def test_vae_log_meter_reads_the_device_once_per_window(monkeypatch):
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _f=original, **k: reads.append(_n) or _f(self, *a, **k))
    meter = LogMeter()
    steps = [{"loss": torch.tensor(0.5 + i), "kappa": torch.tensor([1.0, 3.0 + i]).mean(), "lr": 1e-4 * (i + 1)}
             for i in range(4)]
    for i, logs in enumerate(steps):
        meter.add({**logs, **({"disc_loss": torch.tensor(2.0)} if i >= 2 else {})})  # a key appearing mid-window
    assert reads == []  # no host read per step: the sums are still tensors
    assert all(torch.is_tensor(meter.sums[k]) for k in ("loss", "kappa", "disc_loss"))
    keys, values = meter.mean_tensor()
    assert reads == [] and keys == ["disc_loss", "kappa", "loss", "lr"]
    assert values.tolist() == pytest.approx([2.0, 2.75, 2.0, 2.5e-4]) and reads == ["tolist"]  # one read a window
    assert meter.means() == pytest.approx({"disc_loss": 2.0, "kappa": 2.75, "loss": 2.0, "lr": 2.5e-4})


# ---------------------------------------------------------------------------------------------------------------
# 6. EMA with sharded parameters


def test_ema_is_refused_when_fsdp_or_zero3_shards_the_parameters(monkeypatch, tmp_path):
    def args(**kw) -> SphereARTrainingArguments:
        return SphereARTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    with pytest.raises(ValueError, match=r"--ema_decay 0.9999 with FSDP: .* pass --ema_decay 0"):
        SphereARTrainer(model=tiny_transformer(), args=args(fsdp="full_shard auto_wrap"))
    check_ema_supported(args(fsdp="full_shard", ema_decay=0.0), 0.0)  # no EMA: FSDP is fine
    plain = args()  # (made first: with DeepSpeed in the environment TrainingArguments need it installed)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed --zero_stage 3
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ValueError, match=r"--ema_decay 0.9999 with DeepSpeed ZeRO-3: .* pass --ema_decay 0"):
        SphereARTrainer(model=tiny_transformer(), args=plain)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    check_ema_supported(plain, 0.9999)  # ZeRO-2 keeps whole parameters
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    for stage, refused in ((3, True), (2, False)):
        config = {"zero_optimization": {"stage": stage}}
        path = tmp_path / f"ds{stage}.json"
        path.write_text(json.dumps(config))
        for deepspeed in (config, str(path)):
            namespace = SimpleNamespace(fsdp=None, deepspeed=deepspeed)
            if refused:
                with pytest.raises(ValueError, match="ZeRO-3"):
                    check_ema_supported(namespace, 0.5)
            else:
                check_ema_supported(namespace, 0.5)
