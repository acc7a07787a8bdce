"""LoRA (PEFT) on the SphereAR transformer: the targets and configuration, loading an adapter imports no training
code, the example on an imagefolder, a real fine-tune of the bundled digits model on a restyled copy of its data (the
style shows, the digits stay readable, unloading restores the base bit for bit), and the adapter's own model card and
push (also from the example's --push_to_hub). Save / load / merge / unload on a tiny pipeline are tested in
test_lora_adapters.py, with this module's helpers. benchmarks/bench_lora.py measures more."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import peft  # noqa: E402
import pytest
import torch
from PIL import Image

from sphere_ar_hf import SphereARPipeline  # noqa: E402
from sphere_ar_hf.lora import (  # noqa: E402
    adapter_parameter_count,
    add_lora,
    build_lora_config,
    get_lora_model,
    load_lora,
    merge_lora,
    save_lora,
    unload_lora,
)
from sphere_ar_hf.pretrained import bundled_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRUNK = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load("train_lora_example", ROOT / "examples" / "train_lora.py")


@pytest.fixture(scope="module")
def bench():
    return _load("bench_lora", ROOT / "benchmarks" / "bench_lora.py")


pytestmark = pytest.mark.usefixtures("one_thread")


def lora_module_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in before)


def sample(pipe: SphereARPipeline, labels=(1, 3, 9), seed: int = 0) -> torch.Tensor:
    return pipe(list(labels), guidance_scale=2.0, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                output_type="latent").images


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# targets and configuration


def test_default_targets_are_the_trunk_linears_only(make_transformer):
    model = make_transformer()
    peft_model = add_lora(model, build_lora_config(rank=4))
    layers = model.config.num_hidden_layers
    assert lora_module_names(model) == {f"layers.{i}.{t}" for i in range(layers) for t in TRUNK}
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.head.modules())  # head w1/w2 untouched
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    c = model.config
    per_layer = 4 * (c.hidden_size + 3 * c.hidden_size + 2 * c.hidden_size + c.hidden_size + 2 * c.intermediate_size
                     + c.intermediate_size + c.hidden_size)
    assert adapter_parameter_count(peft_model) == layers * per_layer
    # the transformer carries the adapters (PEFT's marker on it, nothing of ours); the PeftModel is a view of it
    assert get_lora_model(model) is model and get_lora_model(peft_model) is peft_model
    assert model.peft_config is peft_model.peft_config


def test_head_and_class_rows_are_optional(make_transformer):
    model = make_transformer()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = add_lora(model, build_lora_config(rank=2, lora_head=True, class_rows=[7, 3, 3]))
    assert lora_module_names(model) == linears - {"proj_in"}  # every trunk and head linear
    assert isinstance(model.class_embedding, peft.utils.other.TrainableTokensWrapper)
    assert peft_model.peft_config["default"].trainable_token_indices == {"class_embedding": [3, 7]}
    deltas = [p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n]
    assert len(deltas) == 1 and deltas[0].shape == (2, model.config.hidden_size * model.config.num_class_tokens)
    with pytest.raises(ValueError, match="already has a LoRA"):
        add_lora(model, build_lora_config(rank=2))


def test_config_errors():
    with pytest.raises(ValueError, match="rank"):
        build_lora_config(rank=0)
    with pytest.raises(ValueError, match=r"class_rows must lie in \[0, 10\]"):
        build_lora_config(class_rows=[11], num_classes=10)


LOAD_ONLY = """
import sys
from sphere_ar_hf import SphereARPipeline
from sphere_ar_hf.lora import adapter_parameter_count, load_lora, merge_lora, unload_lora
pipe = SphereARPipeline.from_pretrained(sys.argv[1])
load_lora(pipe, sys.argv[2])
assert adapter_parameter_count(pipe) > 0
unload_lora(pipe)
load_lora(pipe, sys.argv[2])
merge_lora(pipe)
print(" ".join(sorted(m for m in sys.modules if m.startswith(("sphere_ar_hf.training", "transformers.trainer")))))
"""


def test_loading_an_adapter_imports_no_training_code(make_pipeline, adapter_dir, tmp_path):
    """The adapter API (``sphere_ar_hf.lora``) stands apart from LoRA training (``sphere_ar_hf.training.lora``): a
    fresh process that loads, unloads and merges an adapter imports neither our training code nor the Trainer."""
    import os
    import subprocess
    import sys

    make_pipeline().save_pretrained(str(tmp_path / "base"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_ONLY, str(tmp_path / "base"), str(adapter_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [], proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# the example


def test_example_on_an_imagefolder(example, make_pipeline, tmp_path, capsys):
    """Three steps on an imagefolder of two classes re-purposing classes 3 and 7 (their embedding rows trained too),
    with the head and checkpointing: the adapter is written, holds the rows, and merging changes exactly those rows
    of the class embedding; the startup summary counts epochs as the Trainer does, and a CPU run does not warn
    about pinned memory."""
    import warnings

    base_dir = tmp_path / "base"
    pipe = make_pipeline()
    pipe.save_pretrained(str(base_dir))
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = example.main([
            "--pretrained_model", str(base_dir), "--train_data_dir", str(tmp_path / "images"), "--output_dir",
            str(tmp_path / "run"), "--lora_rank", "2", "--lora_head", "--class_ids", "3", "7",
            "--train_class_embeddings", "3", "7",
            "--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--use_cpu",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", "2", "--disable_tqdm", "True"])
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    # 8 images in batches of 4: 2 steps per epoch, so 3 steps are 1.5 epochs (the Trainer's own count)
    assert "3 optimizer steps (1.5 epochs of 2 steps)" in capsys.readouterr().err
    assert Path(adapter) == tmp_path / "run" / "adapter"
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"class_embedding": [3, 7]} and config["r"] == 2
    assert (tmp_path / "run" / "checkpoint-2" / "checkpoint_complete.json").is_file()
    pipe = SphereARPipeline.from_pretrained(str(base_dir))
    before = pipe.transformer.class_embedding.weight.detach().clone()
    load_lora(pipe, adapter)
    assert "head.res_blocks.0.w1" in lora_module_names(pipe.transformer)
    merge_lora(pipe)
    after = pipe.transformer.class_embedding.weight
    assert [i for i in range(len(before)) if not torch.equal(after[i], before[i])] == [3, 7]


# ---------------------------------------------------------------------------------------------------------------
# the digits model, restyled


STYLE = "heavy"
STEPS = 60
N_PER_CLASS = 10
# Measured on the bundled model (3 sampling seeds, 100 images, 25 steps): mean ink of the base samples 0.305-0.310,
# adapted 0.354-0.358 after 60 steps (0.370 after 300 in benchmarks/bench_lora.py; the S-VAE's reconstruction of the
# restyled real digits, the most its gray-only decoder can show, is 0.377). Classifier accuracy: base 97-99%,
# adapted 85-92% (the style itself costs this much: 92.8% on the restyled real test digits, 88.3% on their
# reconstructions). The bounds below leave room for other CPUs / BLAS builds.
INK_MARGIN = 0.03
MIN_ACCURACY = 0.75


def test_digits_fine_tune_shows_the_style_and_keeps_the_digits(example, bench, tmp_path):
    from sphere_ar_hf.evaluation.digits import DigitClassifier, generate_digits, load_digit_splits

    model = bundled_model_path("digits")
    splits = load_digit_splits()
    data = bench.write_style_dataset(splits.train_images, splits.train_labels, STYLE, tmp_path / "data")
    adapter = Path(example.main([
        "--pretrained_model", str(model), "--dataset_path", str(data), "--output_dir", str(tmp_path / "run"),
        "--aug_ratio", "0", "--hflip", "False", "--max_steps", str(STEPS), "--per_device_train_batch_size", "32",
        "--learning_rate", "2e-3", "--min_lr", "2e-4", "--use_cpu", "--dataloader_num_workers", "0",
        "--disable_tqdm", "True", "--seed", "0"]))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {f.name for f in adapter.iterdir()}

    pipe = SphereARPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    base_params = sum(p.numel() for p in pipe.transformer.parameters())
    before = snapshot(pipe.transformer)
    classifier = DigitClassifier.fit_real(splits, size=pipe.vae.config.image_size)

    def generate() -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = generate_digits(pipe, N_PER_CLASS, num_inference_steps=25, seed=1)
        return images, labels

    base_images, labels = generate()
    load_lora(pipe, adapter)
    assert adapter_parameter_count(pipe) <= 0.10 * base_params
    images, _ = generate()
    base_ink, ink = bench.style_score(base_images, STYLE), bench.style_score(images, STYLE)
    accuracy = classifier.accuracy(images, labels)
    assert ink >= base_ink + INK_MARGIN, (base_ink, ink)
    assert accuracy >= MIN_ACCURACY, (accuracy, classifier.accuracy(base_images, labels))

    unload_lora(pipe)
    assert_same_weights(pipe.transformer, before)
    assert np.array_equal(generate()[0], base_images)


# ---------------------------------------------------------------------------------------------------------------
# the adapter's own model card, and pushing it


class FakeHub:
    """Records what a push asks of the Hub (also stands in for ``transformers.trainer.hf_api()``)."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, *args, **kwargs):
        import types

        if args:
            kwargs["repo_id"] = args[0]
        self.calls.append(("create_repo", kwargs))
        return types.SimpleNamespace(repo_id=kwargs["repo_id"])

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_saved_adapter_has_our_card(adapter_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter_dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and "lora" in data["tags"] and "sphere-ar" in data["tags"]
    assert "base_model" not in data  # "tiny" is no Hub repo id
    text = card.text
    assert "| Base model | `tiny` |" in text and "| Rank | 4 |" in text and "| Alpha | 8.0 (scale 2) |" in text
    assert "| Trained class-embedding rows | 1, 10 |" in text and "feed_forward" in text  # the target regex
    values = sum(t.numel() for t in adapter_tensors(adapter_dir).values())
    assert f"| Stored values | {values:,} |" in text
    assert "Not measured for this adapter." in text and "no training record" in text
    assert "Model Card for Model ID" not in text  # not PEFT's blank template


def test_public_model_name_is_never_an_absolute_path(tmp_path):
    from sphere_ar_hf.hub.cards import public_model_name

    assert public_model_name("someone/sphere-ar-digits") == "someone/sphere-ar-digits"
    (tmp_path / "my-base").mkdir()
    assert public_model_name(tmp_path / "my-base") == "my-base"
    snapshot = tmp_path / "hub" / "models--someone--sphere-ar-b" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert public_model_name(snapshot) == "someone/sphere-ar-b"
    assert public_model_name(bundled_model_path("digits")) == "digits"


def test_card_records_training_and_the_style_score(make_pipeline, tmp_path):
    from huggingface_hub import ModelCard

    pipe = make_pipeline()
    add_lora(pipe.transformer, build_lora_config(rank=2))
    (tmp_path / "base").mkdir()
    bench_result = {"style": "heavy", "real_restyled_style": 0.41,
                    "generated": {"base": {"style": 0.305}, "adapted": {"style": 0.357}}}
    out = save_lora(pipe, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base",
                    training_info={"dataset": "digits-heavy (a local dataset folder)", "global_step": 60,
                                   "epochs": 1.5, "date": "2026-01-02T03:04:05Z"}, style=bench_result)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "| Base model | `base` |" in text
    assert "| Dataset | digits-heavy (a local dataset folder) |" in text and "| Optimizer steps | 60 |" in text
    assert "| Finished (UTC) | 2026-01-02T03:04:05Z |" in text
    assert "| base model | 0.305 |" in text and "| with the adapter | 0.357 |" in text and "'heavy'" in text
    assert ModelCard(text).data.license is None
    with pytest.raises(ValueError, match="bench_lora.py --json"):
        save_lora(pipe, tmp_path / "bad", style={"ink": 1})


def test_push_lora_uploads_the_adapter_with_its_card(adapter_dir):
    from huggingface_hub import ModelCard

    from sphere_ar_hf.hub import HubError, push_lora

    api = FakeHub()
    with pytest.raises(HubError, match="a license is required"):
        push_lora(adapter_dir, "someone/lora", license=None, api=api)
    url = push_lora(adapter_dir, "someone/lora", license="mit", api=api)
    assert url == "https://huggingface.co/someone/lora"
    (_, create), (_, upload) = api.calls
    assert create["repo_id"] == "someone/lora" and upload["repo_id"] == "someone/lora"
    assert sorted(upload["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.license == "mit" and 'load_lora(pipe, "someone/lora")' in card.text


def test_train_lora_push_to_hub(example, make_pipeline, tmp_path, monkeypatch):
    """``--push_to_hub`` of the LoRA example pushes the adapter with its card (fake Hub), base named relatively."""
    import transformers.trainer
    from huggingface_hub import ModelCard

    from sphere_ar_hf.hub import push as hub_push

    api = FakeHub()
    monkeypatch.setattr(hub_push, "hf_api", lambda token=None: api)
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    base_dir = tmp_path / "base"
    make_pipeline().save_pretrained(str(base_dir))
    for c in range(2):
        folder = tmp_path / "images" / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 50 * c + i, np.uint8)).save(folder / f"{i}.png")
    adapter = Path(example.main([
        "--pretrained_model", str(base_dir), "--train_data_dir", str(tmp_path / "images"), "--output_dir",
        str(tmp_path / "run"), "--lora_rank", "2", "--class_ids", "3", "7", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "True",
        "--push_to_hub", "--hub_model_id", "someone/my-lora", "--hub_license", "apache-2.0"]))
    assert [name for name, _ in api.calls] == ["create_repo", "create_repo", "upload_folder"]
    upload = api.calls[-1][1]
    assert upload["repo_id"] == "someone/my-lora" and "README.md" in upload["files"]
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.license == "apache-2.0" and "| Base model | `base` |" in card.text
    assert "| Optimizer steps | 2 |" in card.text and "images (a local image folder)" in card.text
    assert str(tmp_path) not in card.text and str(tmp_path).encode() not in upload["files"]["adapter_config.json"]
    assert (adapter / "README.md").is_file() and (adapter / "training_info.json").is_file()


def test_refused_adapter_folder_names_the_parameter_or_the_flag(example, make_pipeline, adapter_dir, tmp_path):
    """``save_lora`` names its parameter (``output_dir``); the example script names its flag."""
    from sphere_ar_hf.utils import OutputFolderError

    pipe = make_pipeline()
    load_lora(pipe, adapter_dir)
    with pytest.raises(OutputFolderError, match="an input of this run; choose another output_dir$"):
        save_lora(pipe, tmp_path, inputs=[adapter_dir])
    base_dir = tmp_path / "base"
    make_pipeline().save_pretrained(str(base_dir))
    (tmp_path / "images" / "a").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="an input of this run; choose another --adapter_output_dir$"):
        example.main(["--pretrained_model", str(base_dir), "--train_data_dir", str(tmp_path / "images"),
                      "--adapter_output_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--use_cpu"])
    assert not (tmp_path / "run").exists()


def test_example_help_shows_its_command_lines_as_written(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--train_data_dir my_images \\\n        --output_dir lora-run" in out  # not run together
