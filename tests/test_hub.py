"""Model cards, the Space README and `sphere-ar push` (with a fake Hub client: nothing leaves the machine)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard

from sphere_ar_hf import SphereARPipeline, hub, remote_code
from sphere_ar_hf.configuration_sphere_ar import PRESETS

REPO_ID = "someone/sphere-ar-test"
ARXIV = "https://arxiv.org/abs/2509.24335"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_pipeline) -> Path:
    path = tmp_path_factory.mktemp("hub") / "pipeline"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, tiny_pipeline) -> Path:
    """The tiny pipeline dressed as the digits model: classes "0".."9", its own recommended guidance."""
    path = tmp_path_factory.mktemp("hub") / "digits"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    index = json.loads((path / "model_index.json").read_text())
    index["id2label"] = {str(i): str(i) for i in range(10)}
    (path / "model_index.json").write_text(json.dumps(index))
    config = json.loads((path / "transformer" / "config.json").read_text())
    config["guidance_scale"] = 2.5
    (path / "transformer" / "config.json").write_text(json.dumps(config))
    return path


def files_of(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(*argv: str | Path) -> tuple[int, str, str]:
    """``sphere-ar push ARGV`` through a parser wired exactly as cli.py wires it."""
    parser = argparse.ArgumentParser(prog="sphere-ar")
    hub.add_push_parser(parser.add_subparsers(dest="command", required=True))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = parser.parse_args(["push", *map(str, argv)])
        except SystemExit as e:
            return int(e.code or 0), out.getvalue(), err.getvalue()
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


class FakeHubApi:
    """Records what the push asks of the Hub; ``upload_folder`` snapshots the folder while it exists."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail = fail

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if self.fail is not None:
            raise self.fail
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", {**kwargs, "files": files_of(folder)}))


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHubApi:
    api = FakeHubApi()
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    return api


# ---- model cards ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("card, name, fid", [("b", "SphereAR-B", "1.92"), ("l", "SphereAR-L", "1.54"),
                                             ("h", "SphereAR-H", "1.34")])
def test_imagenet_card(pipeline_dir, tiny_pipeline, card, name, fid):
    text = str(hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="cc-by-nc-4.0", card=card))
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
    assert f'SphereARPipeline.from_pretrained("{REPO_ID}")' in body
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
    assert f"{hub.format_millions(n_tf)} parameters" in body
    assert "guidance_scale=4.5," in body and "generates 32×32 images of the 10 ImageNet-1k classes" in body


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


def test_card_without_remote_code(pipeline_dir):
    card = hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", card="b", remote_code=False)
    assert "trust_remote_code" not in card.text and "custom_code" not in card.data.tags


def test_card_other_license(pipeline_dir):
    card = hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="other", card="h",
                                 license_name="sphere-ar-weights", license_link="https://example.org/license")
    data = ModelCard(str(card)).data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "sphere-ar-weights", "https://example.org/license")


@pytest.mark.parametrize("license, match", [
    (None, "a license is required"), ("", "a license is required"), ("  ", "a license is required"),
    ("MIT License", "not a Hub license id"), ("other", "needs a license name and a link")])
def test_card_license_is_required(pipeline_dir, license, match):
    with pytest.raises(hub.HubError, match=match):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license=license, card="b")


def test_card_license_id_is_normalized(pipeline_dir):
    assert hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="Apache-2.0", card="b").data.license == \
        "apache-2.0"


def test_card_bad_inputs(pipeline_dir, tmp_path):
    with pytest.raises(hub.HubError, match="owner/name"):
        hub.render_model_card(pipeline_dir, repo_id="no-owner", license="mit", card="b")
    with pytest.raises(hub.HubError, match="unknown card"):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", card="xl")
    with pytest.raises(hub.HubError, match="pass card= / --card"):  # the tiny model is none of the four
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit")
    with pytest.raises(hub.HubError, match="no model_index.json"):
        hub.render_model_card(tmp_path, repo_id=REPO_ID, license="mit", card="b")
    with pytest.raises(hub.HubError, match="card templates"):
        hub.render_model_card(pipeline_dir, repo_id=REPO_ID, license="mit", card="b", template_dir=tmp_path / "x")


def test_detect_card_official_sizes():
    def facts(preset: dict | None = None, classes: int = 1000, labels: dict | None = None) -> dict:
        preset = preset or {"hidden_size": 64, "num_hidden_layers": 2}
        return {"num_classes": classes, "id2label": labels or {}, "hidden_size": preset["hidden_size"],
                "num_hidden_layers": preset["num_hidden_layers"]}

    assert [hub.detect_card(facts(PRESETS[f"SphereAR-{v}"])) for v in "BLH"] == ["b", "l", "h"]
    assert hub.detect_card(facts(classes=10, labels={i: str(i) for i in range(10)})) == "digits"
    with pytest.raises(hub.HubError, match="--card"):
        hub.detect_card(facts(PRESETS["SphereAR-B"], classes=10))


def test_space_card():
    card = hub.render_space_card(license="mit", models=["someone/sphere-ar-b", "someone/sphere-ar-digits"])
    parsed = SpaceCard(str(card))
    data = parsed.data.to_dict()
    assert data["sdk"] == "gradio" and data["sdk_version"].startswith("6.31.")
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
    (templates / "space" / "app.py").write_text("print('demo')\n")
    out = hub.build_space_folder(tmp_path / "space", license="mit", models=["someone/sphere-ar-digits"],
                                 template_dir=templates)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "app.py"]
    assert SpaceCard.load(out / "README.md").data.models == ["someone/sphere-ar-digits"]
    assert (templates / "space" / "README.md").read_text().count("{{ license }}") == 1  # the template is kept


# ---- sphere-ar push -------------------------------------------------------------------------------------------------
def test_dry_run_writes_the_folder_and_uploads_nothing(pipeline_dir, tmp_path, fake_hub):
    before = files_of(pipeline_dir)
    out = tmp_path / "out"
    code, stdout, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--card", "b",
                             "--dry-run", out)
    assert code == 0, err
    assert "nothing was uploaded" in stdout
    assert fake_hub.calls == []
    files = files_of(out)
    assert {"README.md", "model_index.json", "remote_pipeline.py", "pipeline_sphere_ar.py",
            "transformer/remote_code.py", "vae/remote_code.py", "scheduler/remote_code.py"} <= set(files)
    assert all(files[k] == v for k, v in before.items() if k.endswith(".safetensors"))
    assert ModelCard.load(out / "README.md").data.license == "mit"
    assert files_of(pipeline_dir) == before  # the source folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind
    # an existing folder is replaced only with --overwrite
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--card", "b",
                        "--dry-run", out)
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "apache-2.0", "--card", "b",
                        "--dry-run", out, "--overwrite")
    assert code == 0, err
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"


def test_push_folder_of_a_pushed_folder(pipeline_dir, tmp_path):
    """Pushing a pushed folder again gives the same files; without remote code, the plain pipeline folder."""
    first = hub.build_push_folder(pipeline_dir, tmp_path / "first", repo_id=REPO_ID, license="mit", card="b")
    again = hub.build_push_folder(first, tmp_path / "again", repo_id=REPO_ID, license="mit", card="b")
    assert files_of(again) == files_of(first)
    plain = hub.build_push_folder(first, tmp_path / "plain", repo_id=REPO_ID, license="mit", card="b",
                                  remote_code=False)
    expected = files_of(pipeline_dir)
    files = files_of(plain)
    assert sorted(files) == sorted([*expected, "README.md"])
    assert json.loads((plain / "model_index.json").read_text()) == json.loads(
        (pipeline_dir / "model_index.json").read_text())
    assert "auto_map" not in json.loads((plain / "transformer" / "config.json").read_text())
    assert all(files[k] == v for k, v in expected.items() if k.endswith(".safetensors"))


@pytest.mark.parametrize("private", [False, True])
def test_push_uploads_exactly_the_dry_run_folder(pipeline_dir, tmp_path, fake_hub, private):
    args = ["--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--card", "b"]
    assert push(*args, "--dry-run", tmp_path / "dry")[0] == 0
    before = set(pipeline_dir.parent.iterdir())
    code, stdout, err = push(*args, *(["--private"] if private else []))
    assert code == 0, err
    assert f"https://huggingface.co/{REPO_ID}" in stdout
    assert [name for name, _ in fake_hub.calls] == ["create_repo", "upload_folder"]
    create, upload = fake_hub.calls[0][1], fake_hub.calls[1][1]
    assert create == {"repo_id": REPO_ID, "repo_type": "model", "private": private, "exist_ok": True}
    assert upload["repo_id"] == REPO_ID and upload["repo_type"] == "model"
    assert upload["files"] == files_of(tmp_path / "dry")  # the same files, byte for byte
    assert sorted(upload["delete_patterns"]) == ["scheduler/*", "transformer/*", "vae/*"]
    assert not Path(upload["folder_path"]).exists()  # the staging folder is gone
    assert set(pipeline_dir.parent.iterdir()) == before


def test_push_library_function(pipeline_dir):
    api = FakeHubApi()
    url = hub.push_pipeline(pipeline_dir, REPO_ID, license="mit", card="b", private=True, api=api,
                            commit_message="first upload")
    assert url == f"https://huggingface.co/{REPO_ID}"
    assert api.calls[1][1]["commit_message"] == "first upload" and api.calls[0][1]["private"] is True
    with pytest.raises(hub.HubError, match="a license is required"):
        hub.push_pipeline(pipeline_dir, REPO_ID, license=None, card="b", api=api)
    assert len(api.calls) == 2


def test_push_without_license_is_a_clear_error(pipeline_dir, tmp_path, fake_hub):
    for extra in ([], ["--dry-run", tmp_path / "out"]):
        code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--card", "b", *extra)
        assert code == 2
        assert err.startswith("error: --license is required") and "never guessed" in err
    assert fake_hub.calls == [] and not (tmp_path / "out").exists()


def test_push_input_errors(pipeline_dir, tmp_path, fake_hub):
    cases = [
        (["--pipeline", tmp_path / "missing", "--repo-id", REPO_ID], "no such folder"),
        (["--pipeline", tmp_path, "--repo-id", REPO_ID], "no model_index.json"),
        (["--pipeline", pipeline_dir, "--repo-id", "bad id"], "owner/name"),
        (["--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "Not An Id"], "not a Hub license id"),
        (["--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--dry-run", pipeline_dir / "out"], "must not be"),
    ]
    for argv, message in cases:
        code, _, err = push(*argv, *([] if "--license" in argv else ["--license", "mit"]), "--card", "b")
        assert code == 2 and err.startswith("error: ") and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1
    assert fake_hub.calls == []
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--card", "xl")
    assert code == 2 and "invalid choice" in err  # argparse usage error


def test_push_reports_hub_errors(pipeline_dir, monkeypatch):
    class HfHubHTTPError(Exception):
        pass

    HfHubHTTPError.__module__ = "huggingface_hub.errors"
    api = FakeHubApi(fail=HfHubHTTPError("401 Unauthorized: invalid token"))
    monkeypatch.setattr(hub, "_hf_api", lambda: api)
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--card", "b")
    assert code == 2 and err.strip() == "error: the upload failed: 401 Unauthorized: invalid token"


def test_cli_wiring():
    from sphere_ar_hf.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "push" in commands
    args = parser.parse_args(["push", "--pipeline", "p", "--repo-id", REPO_ID, "--license", "mit"])
    assert args.func is hub.run_push


# ---- loading a pushed folder with the installed package --------------------------------------------------------------
def package_pipeline_class() -> type[SphereARPipeline]:
    """SphereARPipeline, which maps a pushed repository's remote-code entries back to this package."""
    assert "load_config" in SphereARPipeline.__dict__ and "download" in SphereARPipeline.__dict__
    return SphereARPipeline


def test_package_loads_pushed_folder_without_its_code(pipeline_dir, tmp_path):
    repo = hub.build_push_folder(pipeline_dir, tmp_path / "repo", repo_id=REPO_ID, license="mit", card="b")
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
    repo = hub.build_push_folder(pipeline_dir, tmp_path / "repo", repo_id=REPO_ID, license="mit", card="b")
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
