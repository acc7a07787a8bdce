"""Model cards and the Space README: the ImageNet and digits cards, their licenses and bad inputs, the card
detection, the Space's card and folder; and a pushed folder loaded by the installed package (from a folder or the
Hub cache, its remote code never run). `sphere-ar push` itself is tested in test_hub_push.py."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard

from sphere_ar_hf import SphereARPipeline, hub, remote_code
from sphere_ar_hf.configuration_sphere_ar import PRESETS
from sphere_ar_hf.labels import imagenet_id2label
from sphere_ar_hf.pretrained import bundled_model_path
from sphere_ar_hf.utils import format_millions

REPO_ID = "someone/sphere-ar-test"
ARXIV = "https://arxiv.org/abs/2509.24335"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_pipeline) -> Path:
    path = tmp_path_factory.mktemp("hub") / "pipeline"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """A copy of the bundled digits model (its weights identify it) with another recommended guidance."""
    path = tmp_path_factory.mktemp("hub") / "digits"
    shutil.copytree(bundled_model_path("digits"), path)
    config = json.loads((path / "transformer" / "config.json").read_text())
    config["guidance_scale"] = 2.5
    (path / "transformer" / "config.json").write_text(json.dumps(config))
    return path


def edit_config(folder: Path, component: str | None = None, **values) -> None:
    """Set entries of a pipeline folder's model_index.json (component None) or a component's config.json."""
    path = folder / "model_index.json" if component is None else folder / component / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory, tiny_pipeline) -> Path:
    """The tiny pipeline's weights under a converted SphereAR-B's configs (1000 ImageNet-1k classes, B's width and
    depth): what the cards read. Its weights do not load into those configs; the cards never load them."""
    path = tmp_path_factory.mktemp("hub") / "imagenet"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    preset = PRESETS["SphereAR-B"]
    edit_config(path, id2label={str(k): v for k, v in imagenet_id2label().items()})
    edit_config(path, "transformer", num_classes=1000, hidden_size=preset["hidden_size"],
                num_hidden_layers=preset["num_hidden_layers"])
    return path


# ---- model cards ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("card, name, fid", [("b", "SphereAR-B", "1.92"), ("l", "SphereAR-L", "1.54"),
                                             ("h", "SphereAR-H", "1.34")])
def test_imagenet_card(pipeline_dir, imagenet_dir, tiny_pipeline, tmp_path, card, name, fid):
    folder = imagenet_dir
    if card != "b":
        folder = tmp_path / card
        shutil.copytree(imagenet_dir, folder)
        preset = PRESETS[name]
        edit_config(folder, "transformer", hidden_size=preset["hidden_size"],
                    num_hidden_layers=preset["num_hidden_layers"])
    assert hub.detect_card(hub.pipeline_facts(folder)) == card
    text = str(hub.render_model_card(folder, repo_id=REPO_ID, license="cc-by-nc-4.0"))  # card="auto"
    parsed = ModelCard(text)  # what the Hub parses
    data = parsed.data.to_dict()
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert data["license"] == "cc-by-nc-4.0"
    assert data["datasets"] == ["ILSVRC/imagenet-1k"]
    assert {"sphere-ar", "autoregressive", "class-conditional", "image-generation", "imagenet",
            "arxiv:2509.24335", "custom_code"} <= set(data["tags"])
    body = parsed.text
    assert ARXIV in body
    assert f"# {name}" in body
    assert f'SphereARPipeline.from_pretrained("{REPO_ID}")' in body and "pipe.enable_torch_compile()" in body
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in body
    assert f"| **{name}** (this model) | **" in body and f"**{fid}**" in body
    for row in ("| SphereAR-B |", "| SphereAR-L |", "| SphereAR-H |"):
        assert row in body or f"| **{row[2:-2]}** (this model)" in body
    for value in ("1.92", "1.54", "1.34", "208M", "479M", "943M"):
        assert value in body
    assert "@article{ke2025hyperspherical" in body and "Guolin Ke and Hui Xue" in body
    # facts from the folder's configs and weight headers
    n_tf = sum(p.numel() for p in tiny_pipeline.transformer.parameters())
    n_vae = sum(p.numel() for p in tiny_pipeline.vae.parameters())
    facts = hub.pipeline_facts(pipeline_dir)
    assert (facts["transformer_params"], facts["vae_params"]) == (n_tf, n_vae)
    assert facts["num_labels"] == facts["num_classes"] == 10 and facts["image_size"] == 32
    assert f"{format_millions(n_tf)} parameters" in body
    assert "guidance_scale=4.5," in body and "generates 32×32 images of the 1000 ImageNet-1k classes" in body


def test_digits_card(digits_dir):
    card = hub.render_model_card(digits_dir, repo_id="someone/sphere-ar-digits", license="mit")  # card="auto"
    parsed = ModelCard(str(card))
    data = parsed.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert "digits" in data["tags"] and "imagenet" not in data["tags"] and "arxiv:2509.24335" in data["tags"]
    assert "datasets" not in data  # scikit-learn's digits is not a Hub dataset
    assert "# SphereAR digits" in parsed.text and ARXIV in parsed.text
    assert "guidance_scale=2.5," in parsed.text  # the model's recommended value
    assert 'SphereARPipeline.from_pretrained("someone/sphere-ar-digits")' in parsed.text
    assert "@article{ke2025hyperspherical" in parsed.text


@pytest.mark.parametrize("card", ["b", "generic"])
def test_card_without_remote_code(imagenet_dir, card):
    card = hub.render_model_card(imagenet_dir, repo_id=REPO_ID, license="mit", card=card, remote_code=False)
    assert "trust_remote_code" not in card.text and "custom_code" not in card.data.tags


def test_card_other_license(pipeline_dir):
    card = hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="other",
                                 license_name="sphere-ar-weights", license_link="https://example.org/license")
    data = ModelCard(str(card)).data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "sphere-ar-weights", "https://example.org/license")


@pytest.mark.parametrize("license, match", [
    (None, "a license is required"), ("", "a license is required"), ("  ", "a license is required"),
    ("MIT License", "not a Hub license id"), ("other", "needs a license name and a link")])
def test_card_license_is_required(pipeline_dir, license, match):
    with pytest.raises(hub.HubError, match=match):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license=license)


def test_card_license_id_is_normalized(pipeline_dir):
    assert hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="Apache-2.0").data.license == \
        "apache-2.0"


def test_card_bad_inputs(pipeline_dir, tmp_path):
    with pytest.raises(hub.HubError, match="owner/name"):
        hub.render_model_card(pipeline_dir, repo_id="no-owner", license="mit")
    with pytest.raises(hub.HubError, match="unknown card"):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", card="xl")
    for card in ("b", "l", "h", "digits"):  # the tiny model is none of these: an explicit card is refused
        with pytest.raises(hub.HubError, match=f"`card='{card}'` describes .* leave out `card`"):
            hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", card=card)
    with pytest.raises(hub.HubError, match="no model_index.json"):
        hub.render_model_card(tmp_path, repo_id=REPO_ID, license="mit")
    with pytest.raises(hub.HubError, match="card templates"):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", template_dir=tmp_path / "x")


def test_detect_card_official_sizes():
    def facts(preset: dict | None = None, classes: int = 1000, imagenet: bool = True, **extra) -> dict:
        preset = preset or {"hidden_size": 64, "num_hidden_layers": 2}
        labels = imagenet_id2label() if imagenet and classes == 1000 else {}
        return {"num_classes": classes, "id2label": labels, "imagenet_labels": bool(labels), "training": None,
                "bundled": False, "hidden_size": preset["hidden_size"],
                "num_hidden_layers": preset["num_hidden_layers"], **extra}

    assert [hub.detect_card(facts(PRESETS[f"SphereAR-{v}"])) for v in "BLH"] == ["b", "l", "h"]
    assert hub.detect_card(facts(classes=10, bundled=True)) == "digits"
    # ten classes named "0".."9" are not enough to be the bundled model: its weights are
    assert hub.detect_card(facts(classes=10, id2label={i: str(i) for i in range(10)})) == "generic"
    assert hub.detect_card(facts(PRESETS["SphereAR-B"], classes=10)) == "generic"
    assert hub.detect_card(facts(PRESETS["SphereAR-B"], imagenet=False)) == "generic"  # not ImageNet's names
    trained = facts(PRESETS["SphereAR-B"], training={"dataset": "ILSVRC/imagenet-1k", "global_step": 10})
    assert hub.detect_card(trained) == "generic"  # trained by our scripts, not the official checkpoint
    assert "trained by sphere-ar-hf" in hub.card_problem(trained, "b")
    assert hub.card_problem(facts(PRESETS["SphereAR-B"], imagenet=False), "b") is None  # explicit: no names is ok
    assert hub.card_problem(facts(PRESETS["SphereAR-L"]), "b").startswith("has 1000 classes, width 1024")


def test_space_card():
    card = hub.render_space_card(license="mit", models=["someone/sphere-ar-b", "someone/sphere-ar-digits"])
    parsed = SpaceCard(str(card))
    data = parsed.data.to_dict()
    assert data["sdk"] == "gradio" and data["sdk_version"] == importlib.metadata.version("gradio")
    assert data["app_file"] == "app.py" and data["license"] == "mit" and data["title"] == "SphereAR"
    assert data["models"] == ["someone/sphere-ar-b", "someone/sphere-ar-digits"]
    assert 0 < len(data["short_description"]) <= 60  # the Hub's limit
    assert ARXIV in parsed.text and "{{" not in str(card) and "{%" not in str(card)
    bare = SpaceCard(str(hub.render_space_card(license="apache-2.0"))).data.to_dict()
    assert bare["license"] == "apache-2.0" and "models" not in bare
    with pytest.raises(hub.HubError, match="a license is required"):
        hub.render_space_card(license=None)


def test_space_folder(tmp_path):
    templates = tmp_path / "cards"
    shutil.copytree(hub.HUB_CARDS_DIR, templates)
    (templates / "space" / "app.py").write_text("print('demo of {{ model }}')\n")  # the templates are filled in
    out = hub.build_space_folder(tmp_path / "space", license="mit", model="someone/sphere-ar-digits",
                                 template_dir=templates)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py", "requirements.txt", "sphere_ar_hf"]
    assert (out / "app.py").read_text() == "print('demo of someone/sphere-ar-digits')\n"
    assert SpaceCard.load(out / "README.md").data.models == ["someone/sphere-ar-digits"]
    assert (templates / "space" / "README.md").read_text().count("{{ license }}") == 1  # the template is kept
    # the whole folder, from `sphere-ar space`: tests/test_space.py


def test_digits_card_needs_the_bundled_weights(digits_dir, tmp_path):
    text = str(hub.render_model_card(digits_dir, repo_id=REPO_ID, license="mit"))
    assert "bundled with sphere-ar-hf" in text
    retrained = tmp_path / "retrained"  # same configs and labels, other weights: not the bundled model
    shutil.copytree(digits_dir, retrained)
    weights = next((retrained / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    weights.write_bytes(bytes(data))
    assert hub.detect_card(hub.pipeline_facts(retrained)) == "generic"
    text = str(hub.render_model_card(retrained, repo_id=REPO_ID, license="mit"))
    assert "bundled" not in text and "| 7 | " in text


# ---- loading a pushed folder with the installed package --------------------------------------------------------------
def package_pipeline_class() -> type[SphereARPipeline]:
    """SphereARPipeline, which maps a pushed repository's remote-code entries back to this package."""
    assert "load_config" in SphereARPipeline.__dict__ and "download" in SphereARPipeline.__dict__
    return SphereARPipeline


def test_package_loads_pushed_folder_without_its_code(pipeline_dir, tmp_path):
    repo = hub.build_push_folder(pipeline_dir, tmp_path / "repo", repo_id=REPO_ID, license="mit")
    for code in repo.rglob("*.py"):
        code.write_text("raise RuntimeError('the remote code must not run')\n")
    cls = package_pipeline_class()
    pipe = cls.from_pretrained(repo)
    assert type(pipe.transformer).__module__ == "sphere_ar_hf.modeling_sphere_ar"
    assert type(pipe.vae).__module__ == "sphere_ar_hf.vae"
    assert pipe.config.transformer == ("sphere_ar_hf.modeling_sphere_ar", "SphereARTransformer")
    reference = SphereARPipeline.from_pretrained(pipeline_dir)
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, output_type="pt")
    assert torch.equal(pipe([1], generator=torch.Generator().manual_seed(0), **kwargs).images,
                       reference([1], generator=torch.Generator().manual_seed(0), **kwargs).images)


def test_package_loads_pushed_repo_id_from_the_hub_cache(pipeline_dir, tmp_path):
    """A pushed repository in the local Hub cache (as a download leaves it) loads by repo id, offline."""
    repo = hub.build_push_folder(pipeline_dir, tmp_path / "repo", repo_id=REPO_ID, license="mit")
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "cache"
    model = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(repo, model / "snapshots" / commit)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(commit)
    for code in (model / "snapshots" / commit).rglob("*.py"):
        code.write_text("raise RuntimeError('must not run')\n")
    pipe = package_pipeline_class().from_pretrained(REPO_ID, cache_dir=cache, local_files_only=True)
    assert type(pipe.transformer).__module__ == "sphere_ar_hf.modeling_sphere_ar"
    assert pipe.id2label[0] == "zero, nil"


def test_download_pipeline_skips_code(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = remote_code.download_pipeline(REPO_ID, revision="v1", token=False, local_files_only=True,
                                           cache_dir=tmp_path, custom_pipeline=None, trust_remote_code=False,
                                           variant=None)
    assert folder == str(tmp_path)
    (repo_id, kwargs), = calls
    assert repo_id == REPO_ID and kwargs["revision"] == "v1" and kwargs["local_files_only"] is True
    assert not any(p.endswith(".py") for p in kwargs["allow_patterns"])
    assert {"model_index.json", "*/*.json", "*/*.safetensors"} <= set(kwargs["allow_patterns"])
