"""AR-model training: the recipe's defaults and --help, optimizer groups, the LR schedule, the EMA, the loss, pixel
batches, evaluation, saving and pushing the pipeline, and the activation-checkpointing and torch.compile flags. Its
helpers (a tiny model, its arguments, a latents dataset, the example script's command line) serve the other
test_train_sphere_ar_*.py files; checkpoints and resume are in test_train_sphere_ar_checkpoints.py, the data routes
and two processes in test_train_sphere_ar_data.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TRAIN_AR_CLASS_NAMES as CLASS_NAMES
from conftest import launch_env
from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARTransformer, SphereVAE
from sphere_ar_hf.training.arguments import ModelArguments, SphereARTrainingArguments
from sphere_ar_hf.training.data import DataArguments
from sphere_ar_hf.training.ema import EMA_WEIGHTS_NAME, ParameterEMA
from sphere_ar_hf.training.optimization import official_param_groups
from sphere_ar_hf.training.schedules import official_learning_rate
from sphere_ar_hf.training.trainer import SphereARTrainer, collate_training_batch
from sphere_ar_hf.utils import OutputFolderError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_sphere_ar.py"
PROBE = ROOT / "tests" / "scripts" / "train_probe.py"
TINY_AR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
               head_num_adaln=1, image_size=32, patch_size=16, num_classes=4, num_class_tokens=4)
TINY_VAE = dict(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
                decoder_layers=1)
TIMEOUT = 600


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


pytestmark = pytest.mark.usefixtures("one_thread")


class LatentsDataset(torch.utils.data.Dataset):
    """Fixed sphere-token sequences (4 tokens of 16 dims, radius 4), labels ``i % 4``."""

    def __init__(self, n: int = 8, seed: int = 0):
        x = torch.randn(n, 4, 16, generator=torch.Generator().manual_seed(seed))
        self.latents = torch.nn.functional.normalize(x, dim=-1) * 4.0
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[i], "class_labels": torch.tensor(i % 4)}


def tiny_model(seed: int = 0) -> SphereARTransformer:
    torch.manual_seed(seed)
    return SphereARTransformer(SphereARConfig(**TINY_AR))


def tiny_args(tmp_path: Path, **overrides) -> SphereARTrainingArguments:
    kw = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
              warmup_steps=0, decay_start=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
              dataloader_num_workers=0, disable_tqdm=True)
    return SphereARTrainingArguments(**{**kw, **overrides})


def example_cli(assets: dict[str, Path], output_dir: Path, **flags) -> list[str]:
    args = {"pretrained_vae": assets["vae"], "config_file": assets["config"], "dataset_path": assets["data"],
            "num_classes": 4, "output_dir": output_dir, "per_device_train_batch_size": 4,
            "dataloader_num_workers": 0, "warmup_steps": 2, "decay_start": 10, "logging_steps": 5,
            "report_to": "none", "use_cpu": "true", "disable_tqdm": "true", **flags}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def subprocess_env(**extra: str) -> dict[str, str]:
    return launch_env(**extra)


def load_example():
    spec = importlib.util.spec_from_file_location("train_sphere_ar_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------
# arguments, optimizer, schedule, EMA
def test_light_training_modules_import_without_the_train_extra() -> None:
    """``sphere_ar_hf.training``'s names load on first use: the EMA and the optimizer's groups import where
    ``datasets``, ``lpips`` and ``peft`` are missing (the GPU machine has no ``datasets``); every public name
    resolves."""
    code = ("import sys\n"
            "for m in ('datasets', 'lpips', 'peft'): sys.modules[m] = None  # as if not installed\n"
            "from sphere_ar_hf.training import ParameterEMA\n"
            "from sphere_ar_hf.training.optimization import official_param_groups\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('sphere_ar_hf.training.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ema', 'optimization']", out  # not the data, trainer or loss modules
    import sphere_ar_hf.training as training

    for name in training.__all__:
        assert getattr(training, name).__module__.startswith("sphere_ar_hf.training."), name
    assert set(training.__all__) <= set(dir(training))
    with pytest.raises(AttributeError, match="has no attribute 'Trainer'"):
        _ = training.Trainer


def test_defaults_are_the_official_recipe(tmp_path):
    args = SphereARTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert args.learning_rate == 3e-4 and args.min_lr == 1e-5
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.95)
    assert args.weight_decay == 0.05 and args.max_grad_norm == 1.0 and args.ema_decay == 0.9999
    assert args.warmup_steps == 20000 and args.decay_start == 20000 and args.official_lr_schedule
    assert args.num_train_epochs == 400 and args.per_device_train_batch_size == 64  # x 8 GPUs = 512
    assert args.dataloader_drop_last and args.seed == 0 and args.save_strategy == "epoch"
    assert args.report_to == ["tensorboard"] and not args.remove_unused_columns
    assert args.label_names == ["class_labels"] and args.bf16 is False  # bf16 only on a CUDA GPU
    config = SphereARConfig()
    assert config.class_dropout_prob == 0.1 and config.diff_batch_mul == 4


def test_help_lists_every_option(capsys):
    example = load_example()
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for cls in (ModelArguments, DataArguments, SphereARTrainingArguments):
        for f in dataclasses.fields(cls):
            if f.init and not f.name.startswith("_"):
                assert f"--{f.name}" in text, f"--help misses --{f.name}"
    for word in ("SphereAR-B", "SphereAR-L", "SphereAR-H", "official: 0.9999", "latent cache"):
        assert word in text


def _official_no_decay(named: dict[str, torch.Tensor], rename=lambda n: n) -> set[str]:
    """The official ``create_optimizer``'s rule on our names: no decay when ``param.dim() < 2`` or the official
    name contains a ``non_decay_keys()`` entry ("proj_in", "cls_embedding"; our class_embedding)."""
    official = {n: rename(n).replace("class_embedding.", "cls_embedding.") for n in named}
    return {n for n, p in named.items() if p.dim() < 2 or "proj_in" in official[n] or "cls_embedding" in official[n]}


def test_optimizer_groups_no_decay_on_the_official_params(tmp_path):
    model = tiny_model()
    trainer = SphereARTrainer(model=model, args=tiny_args(tmp_path, weight_decay=0.05),
                              train_dataset=LatentsDataset())
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(groups) == {0.05, 0.0}
    no_decay = groups[0.0]
    assert no_decay == _official_no_decay(dict(model.named_parameters()))
    assert {"proj_in.weight", "proj_in.bias", "class_embedding.weight"} <= no_decay
    assert "head_pos_embedding.weight" in groups[0.05]  # 2-d, not in the official no-decay keys
    assert groups[0.05] | no_decay == {n for n, _ in model.named_parameters()}
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == 1e-3
    # one rule for every trainer: the S-VAE trainer's groups of the same model are the same sets
    vae_groups = official_param_groups(model, 0.05)
    assert [{names[id(p)] for p in g["params"]} for g in vae_groups] == [groups[0.05], no_decay]


def test_lora_decays_only_the_lora_matrices(tmp_path):
    from sphere_ar_hf.lora import add_lora, build_lora_config
    from sphere_ar_hf.training.lora import LoraTrainer

    peft_model = add_lora(tiny_model(), build_lora_config(rank=2, lora_head=True, class_rows=[1, 3]))
    trainer = LoraTrainer(model=peft_model, args=tiny_args(tmp_path, weight_decay=0.1),
                          train_dataset=LatentsDataset())
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in peft_model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    assert lora and groups[0.1] == lora and groups[0.0] == trainable - lora
    assert groups[0.0] and all("class_embedding" in n for n in groups[0.0])  # the trained class rows
    # the official rule, applied to the wrapped model's names, agrees
    base = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert groups[0.0] == _official_no_decay(base)


def test_the_trainer_overrides_no_private_trainer_method():
    from transformers import Trainer

    from sphere_ar_hf.training.lora import LoraTrainer

    for cls in (SphereARTrainer, LoraTrainer):
        private = [n for klass in cls.__mro__[:cls.__mro__.index(Trainer)] for n in vars(klass)
                   if n.startswith("_") and not n.startswith("__") and hasattr(Trainer, n)]
        assert private == [], (cls.__name__, private)


def test_push_to_hub_pushes_the_pipeline_not_checkpoints(tmp_path):
    assert tiny_args(tmp_path).hub_strategy == "end"
    args = tiny_args(tmp_path, push_to_hub=True, hub_model_id="me/x", hub_strategy="every_save")
    with pytest.raises(ValueError, match="hub_strategy='end'"):
        SphereARTrainer(model=tiny_model(), args=args, train_dataset=LatentsDataset())


def test_lr_schedule_is_the_official_formula(tmp_path):
    lr, min_lr, total = 1e-3, 1e-5, 100
    trainer = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path, learning_rate=lr, min_lr=min_lr,
                                                                  warmup_steps=10, decay_start=40),
                              train_dataset=LatentsDataset())
    trainer.create_optimizer()
    sched = trainer.create_scheduler(num_training_steps=total)
    seen = []
    for _ in range(total + 1):
        seen.append(trainer.optimizer.param_groups[0]["lr"])  # the lr optimizer step len(seen) - 1 uses
        trainer.optimizer.step()
        sched.step()
    expected = {0: 0.0, 5: lr / 2, 9: lr * 0.9, 10: lr, 39: lr, 40: lr, 70: (lr + min_lr) / 2, 100: min_lr}
    for step, value in expected.items():
        assert seen[step] == pytest.approx(value, rel=1e-9, abs=1e-12), step
    assert seen[55] == pytest.approx(min_lr + (lr - min_lr) * 0.5 * (1 + np.cos(np.pi * 15 / 60)), rel=1e-9)
    for step, value in enumerate(seen):
        assert value == pytest.approx(official_learning_rate(step, total, lr, min_lr, 10, 40), rel=1e-9, abs=1e-12)
    # no decay when decay_start <= 0; a float warmup_steps is a ratio of the total steps
    assert official_learning_rate(90, 100, lr, min_lr, 10, -1) == lr
    assert SphereARTrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1, use_cpu=True).get_warmup_steps(
        100) == 10
    # the schedule's settings are recorded in its state dict, but loading one restores only the step
    assert sched.state_dict()["lr_lambdas"][0]["decay_start"] == 40
    # clamped: never above the peak, never past its end (min_lr from total_steps on), never negative
    for step in (-5, 0, 10, 100, 101, 10**6):
        assert 0.0 <= official_learning_rate(step, total, lr, min_lr, 10, 40) <= lr
    assert official_learning_rate(10**6, total, lr, min_lr, 10, 40) == pytest.approx(min_lr)


def test_ema_update_equals_the_formula(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)  # frozen: not averaged
    ema = ParameterEMA(model, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.bias"]
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for n, p in model.named_parameters():
            if p.requires_grad:
                expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[n], rtol=0, atol=1e-6)
    # save / load round trip, and copy into a model
    ema.save(tmp_path / EMA_WEIGHTS_NAME)
    other = ParameterEMA(model, decay=0.9)
    other.load(tmp_path / EMA_WEIGHTS_NAME)
    assert other.num_updates == 3 and max_abs_diff(other.state_dict(), ema.state_dict()) == 0
    other.copy_to(model)
    assert torch.equal(model[0].weight, ema.state_dict()["0.weight"])
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"0.weight": torch.zeros(4, 3)})


# ---------------------------------------------------------------------------------------------------------------
# loss, batches, flags


def test_loss_falls_and_the_logged_lr_follows_the_schedule(tmp_path):
    dataset = LatentsDataset()
    args = tiny_args(tmp_path, max_steps=60, per_device_train_batch_size=8, warmup_steps=5, decay_start=40,
                     ema_decay=0.99)
    trainer = SphereARTrainer(model=tiny_model(), args=args, train_dataset=dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.6 * first, (first, last)  # measured: about 2.1 -> 0.8
    for h in logs:  # the lr logged at step s is the one optimizer step s - 1 used
        assert h["learning_rate"] == pytest.approx(official_learning_rate(h["step"] - 1, 60, 1e-3, 1e-5, 5, 40),
                                                   rel=1e-6, abs=1e-12)
    # set_epoch before every epoch (8 examples = one step per epoch)
    assert sorted(set(dataset.epochs)) == list(range(60)) and dataset.epochs == sorted(dataset.epochs)
    # the EMA was copied into the model at the end
    assert max_abs_diff(trainer.ema_callback.ema.state_dict(), {n: p.detach() for n, p in
                                                                 trainer.model.named_parameters()}) == 0


def test_pixel_batches_are_encoded_with_posterior_sampling(tmp_path):
    torch.manual_seed(1)
    vae = SphereVAE(**TINY_VAE)
    trainer = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path), vae=vae, train_dataset=LatentsDataset())
    model = trainer.model.eval()  # no label dropout: every draw comes from the (eval) generator
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 3])
    state = torch.Generator().manual_seed(123).get_state()
    trainer._eval_generator.set_state(state)
    loss_pixels = trainer.compute_loss(model, {"pixel_values": pixels, "class_labels": labels})
    g = torch.Generator()
    g.set_state(state)
    latents = vae.normalize(vae.encode(pixels).latent_dist.sample(g))
    assert torch.allclose(latents.norm(dim=-1), torch.full((2, 4), 4.0), atol=1e-5)
    assert not torch.allclose(latents, vae.normalize(vae.encode(pixels).latent_dist.mode()), atol=1e-3)
    loss_latents = model(latents, labels, generator=g).loss
    assert loss_pixels.item() == pytest.approx(loss_latents.item(), rel=1e-6)
    no_vae = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=LatentsDataset())
    with pytest.raises(ValueError, match="no VAE"):
        no_vae.compute_loss(no_vae.model, {"pixel_values": pixels, "class_labels": labels})


def test_evaluate_passes_class_labels_and_returns_the_model_loss(tmp_path, monkeypatch):
    trainer = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=LatentsDataset())
    seen = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda **kw: seen.append(sorted(kw)) or forward(**kw))
    first = trainer.evaluate(eval_dataset=LatentsDataset(seed=1))
    second = trainer.evaluate(eval_dataset=LatentsDataset(seed=1))
    assert np.isfinite(first["eval_loss"]) and first["eval_loss"] == second["eval_loss"]  # same noise each time
    # the noise is drawn before the model (eval mode: no label drop), so that a compiled forward is one graph
    assert seen and all(keys == ["class_labels", "latents", "noise", "timesteps"] for keys in seen)
    state = trainer.generator.get_state()
    trainer.evaluate(eval_dataset=LatentsDataset(seed=1))
    assert torch.equal(trainer.generator.get_state(), state)  # evaluation leaves the training noise alone


def test_save_pipeline_and_push_to_hub_upload_the_pipeline_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:  # no network in tests
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = tiny_args(tmp_path, hub_model_id="me/tiny-sphere-ar", hub_token="secret", hub_license="mit")
    trainer = SphereARTrainer(model=tiny_model(), args=args, vae=SphereVAE(**TINY_VAE), train_dataset=LatentsDataset())
    out = trainer.save_pipeline(tmp_path / "pipe", dict(enumerate(CLASS_NAMES)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    trainer.push_pipeline_to_hub(out)
    assert calls[:2] == [("token", "secret"), ("create", "me/tiny-sphere-ar", True)]
    (_, repo, files), = calls[2:]
    # the publisher's folder: the pipeline, a model card and the remote code
    assert repo == "me/tiny-sphere-ar" and "README.md" in files and "remote_pipeline.py" in files
    assert {"model_index.json", "scheduler", "transformer", "vae"} <= set(files)
    assert SphereARPipeline.from_pretrained(str(out)).id2label[2] == "blue"
    # the library names its parameter (the example script names its flag: test_output_folders)
    with pytest.raises(OutputFolderError, match="an input of this run; choose another output_dir$"):
        trainer.save_pipeline(tmp_path, inputs=[out])


def test_undecodable_batch_becomes_a_zero_weight_step(tmp_path):
    assert collate_training_batch([None, None]) == {}
    batch = collate_training_batch([None, {"latents": torch.ones(4, 16), "class_labels": torch.tensor(2)}])
    assert batch["latents"].shape == (1, 4, 16) and batch["class_labels"].tolist() == [2]
    trainer = SphereARTrainer(model=tiny_model(), args=tiny_args(tmp_path), train_dataset=LatentsDataset())
    loss = trainer.training_step(trainer.model, {})
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in trainer.model.parameters())


def test_activation_checkpointing_and_torch_compile_flags(tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    def run(**flags):
        model = tiny_model()
        trainer = SphereARTrainer(model=model, args=tiny_args(tmp_path, **flags), train_dataset=LatentsDataset())
        trainer.train()
        return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    _, base = run()
    calls = []
    checkpoint = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    trainer, ckpt = run(activation_checkpointing=True)
    assert trainer.model.gradient_checkpointing and len(calls) >= 3 * 2  # 2 blocks per step
    assert ckpt == base
    trainer, compiled = run(torch_compile=True, torch_compile_backend="eager")
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert compiled == pytest.approx(base, rel=1e-6)
