"""`sphere-ar push` and the library's push functions, with a fake Hub client (nothing leaves the machine): the dry run,
the upload of exactly the dry run's folder, the one staged upload of pipelines and adapters, the errors and the CLI
wiring; and a model trained with our trainer: its generic card (measured metrics, many classes) and the trainer's
--push_to_hub, which goes through the same publisher."""

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
from huggingface_hub import ModelCard

from sphere_ar_hf import SphereARPipeline, cli_push, hub
from sphere_ar_hf.hub import push as hub_push
from sphere_ar_hf.utils import format_millions
from test_hub import REPO_ID, edit_config


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tiny_pipeline) -> Path:
    path = tmp_path_factory.mktemp("hub") / "pipeline"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path


def files_of(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def push(*argv: str | Path) -> tuple[int, str, str]:
    """``sphere-ar push ARGV`` through a parser wired exactly as cli.py wires it."""
    parser = argparse.ArgumentParser(prog="sphere-ar")
    cli_push.add_push_parser(parser.add_subparsers(dest="command", required=True))
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
    monkeypatch.setattr(hub_push, "hf_api", lambda token=None: api)
    return api


# ---- sphere-ar push -------------------------------------------------------------------------------------------------
def test_dry_run_writes_the_folder_and_uploads_nothing(pipeline_dir, tmp_path, fake_hub):
    before = files_of(pipeline_dir)
    out = tmp_path / "out"
    code, stdout, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit",
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
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit",
                        "--dry-run", out)
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "apache-2.0",
                        "--dry-run", out, "--overwrite")
    assert code == 0, err
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"


def test_push_folder_of_a_pushed_folder(pipeline_dir, tmp_path):
    """Pushing a pushed folder again gives the same files; without remote code, the plain pipeline folder."""
    first = hub.build_push_folder(pipeline_dir, tmp_path / "first", repo_id=REPO_ID, license="mit")
    again = hub.build_push_folder(first, tmp_path / "again", repo_id=REPO_ID, license="mit")
    assert files_of(again) == files_of(first)
    plain = hub.build_push_folder(first, tmp_path / "plain", repo_id=REPO_ID, license="mit",
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
    args = ["--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit"]
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
    url = hub.push_pipeline(pipeline_dir, REPO_ID, license="mit", private=True, api=api,
                            commit_message="first upload")
    assert url == f"https://huggingface.co/{REPO_ID}"
    assert api.calls[1][1]["commit_message"] == "first upload" and api.calls[0][1]["private"] is True
    with pytest.raises(hub.HubError, match="a license is required"):
        hub.push_pipeline(pipeline_dir, REPO_ID, license=None, api=api)
    assert len(api.calls) == 2


def test_pipelines_and_adapters_go_through_the_one_staged_upload(pipeline_dir, tmp_path, monkeypatch):
    """push_pipeline and push_lora are thin wrappers over upload_staged: for each, one create_repo and one upload of
    a folder staged beside its source, which is gone afterwards."""
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.layers.0.attention.wo.lora_A.weight": torch.zeros(2, 64)},
              str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2.0, "target_modules": "x",
                                                             "base_model_name_or_path": "someone/base"}))
    staged, upload_staged = [], hub_push.upload_staged

    def spy(source, fill, repo_id, **kwargs):
        staged.append((Path(source), repo_id))
        return upload_staged(source, fill, repo_id, **kwargs)

    monkeypatch.setattr(hub_push, "upload_staged", spy)
    for push_to, source, repo_id in ((hub.push_pipeline, pipeline_dir, REPO_ID),
                                     (hub.push_lora, adapter, "someone/lora")):
        api, before = FakeHubApi(), set(source.parent.iterdir())
        assert push_to(source, repo_id, license="mit", api=api) == f"https://huggingface.co/{repo_id}"
        assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
        assert api.calls[0][1] == {"repo_id": repo_id, "repo_type": "model", "private": False, "exist_ok": True}
        upload = api.calls[1][1]
        stage = Path(upload["folder_path"])
        assert stage.name == "repo" and stage.parent.name.startswith(f".{source.name}.push-")
        assert stage.parent.parent == source.resolve().parent and not stage.parent.exists()
        assert set(source.parent.iterdir()) == before and "README.md" in upload["files"]
    assert staged == [(pipeline_dir, REPO_ID), (adapter, "someone/lora")]
    assert "adapter_model.safetensors" in api.calls[1][1]["files"] and "delete_patterns" not in api.calls[1][1]


def test_push_errors_name_the_flags():
    """The library names its parameters in backquotes; `sphere-ar push` shows them as its flags."""
    error = hub.HubError("`card='b'` describes the converted official SphereAR-B weights; leave out `card` (or pass "
                         "`card='generic'`); `repo_id` 'x' is bad; `sphere-ar evaluate --json` and `other` stay")
    assert cli_push.flag_message(error) == (
        "--card b describes the converted official SphereAR-B weights; leave out --card (or pass --card generic); "
        "--repo-id 'x' is bad; `sphere-ar evaluate --json` and `other` stay")


def test_push_without_license_is_a_clear_error(pipeline_dir, tmp_path, fake_hub):
    for extra in ([], ["--dry-run", tmp_path / "out"]):
        code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, *extra)
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
        code, _, err = push(*argv, *([] if "--license" in argv else ["--license", "mit"]))
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
    monkeypatch.setattr(hub_push, "hf_api", lambda token=None: api)
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit")
    assert code == 2 and err.strip() == "error: the upload failed: 401 Unauthorized: invalid token"


def test_cli_wiring():
    from sphere_ar_hf.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert "push" in commands
    args = parser.parse_args(["push", "--pipeline", "p", "--repo-id", REPO_ID, "--license", "mit"])
    assert args.func is cli_push.run_push


# ---- a model trained with our trainer: the generic card, the trainer's --push_to_hub ---------------------------------
DIGIT_NAMES = [f"digit_{i}" for i in range(10)]
PAPER_NUMBERS = ("1.92", "1.54", "1.34", "208M", "479M", "943M")


class FakeTrainerHub(FakeHubApi):
    """Also stands in for ``transformers.trainer.hf_api()`` (the Trainer creates the repository at its start)."""

    def create_repo(self, *args, **kwargs):
        if args:
            kwargs["repo_id"] = args[0]
        super().create_repo(**kwargs)
        import types

        return types.SimpleNamespace(repo_id=kwargs["repo_id"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, FakeTrainerHub]:
    """A tiny model trained by ``train_sphere_ar`` on a 10-class image folder (``digit_0`` .. ``digit_9``) with
    ``--push_to_hub`` to a fake Hub; returns the pipeline folder and the fake's record of the calls."""
    import numpy as np
    import transformers.trainer
    from PIL import Image

    from sphere_ar_hf import SphereARConfig, SphereVAE
    from sphere_ar_hf.training.arguments import ModelArguments, SphereARTrainingArguments
    from sphere_ar_hf.training.data import DataArguments
    from sphere_ar_hf.training.trainer import train_sphere_ar

    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    SphereVAE(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
              decoder_layers=1).save_pretrained(str(root / "vae"))
    SphereARConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64,
                   head_num_layers=2, head_num_adaln=1, image_size=32, patch_size=16, num_classes=10,
                   num_class_tokens=4).to_json_file(str(root / "config.json"))
    for c, name in enumerate(DIGIT_NAMES):
        (root / "images" / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 20 * c, np.uint8)).save(root / "images" / name / "0.png")
    api = FakeTrainerHub()
    args = SphereARTrainingArguments(
        output_dir=str(root / "run"), max_steps=2, per_device_train_batch_size=5, learning_rate=1e-3,
        warmup_steps=0, decay_start=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, ema_decay=0.0, push_to_hub=True,
        hub_model_id="someone/my-digits", hub_license="mit", hub_token="secret")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_push, "hf_api", lambda token=None: api)
        mp.setattr(transformers.trainer, "hf_api", lambda: api)
        out = train_sphere_ar(ModelArguments(pretrained_vae=str(root / "vae"), config_file=str(root / "config.json")),
                              DataArguments(train_data_dir=str(root / "images"), resolution=32), args)
    return out, api


def test_push_of_a_trained_model_needs_no_card_and_claims_only_its_facts(trained, tmp_path, fake_hub):
    """The acceptance test of issue 11: a model trained by our trainer gets a generic card from its folder."""
    folder, _ = trained
    code, stdout, err = push("--pipeline", folder, "--repo-id", "someone/my-digits", "--license", "mit",
                             "--dry-run", tmp_path / "out")
    assert code == 0, err
    assert "model card: generic" in stdout and fake_hub.calls == []
    card = ModelCard.load(tmp_path / "out" / "README.md")
    text = str(card)
    for name in DIGIT_NAMES:  # the classes, by name
        assert f"| {DIGIT_NAMES.index(name)} | {name} |" in text
    pipe = SphereARPipeline.from_pretrained(folder)
    n_tf = sum(p.numel() for p in pipe.transformer.parameters())
    n_vae = sum(p.numel() for p in pipe.vae.parameters())
    assert f"{format_millions(n_tf)} parameters ({n_tf:,})" in text  # the real sizes
    assert f"{format_millions(n_vae)} parameters ({n_vae:,})" in text
    assert "width 64, 2 causal layers" in text and "32×32" in text and "4 tokens of dimension 16" in text
    assert '["digit_0", "digit_1"]' in text  # the usage snippet uses its own class names
    # the trainer's record: the data (a local folder, by its name only), steps, epochs, the date
    record = pipe.transformer.config.training_info
    assert record["dataset"] == "images (a local image folder)" and record["global_step"] == 2
    assert record["num_examples"] == 10 and record["epochs"] == 1.0 and record["init"] == "random"
    assert "| Dataset | images (a local image folder) |" in text and "| Optimizer steps | 2 |" in text
    assert f"| Finished (UTC) | {record['date']} |" in text and "| Training examples | 10 |" in text
    assert str(folder.parent) not in text  # no local paths
    # and nothing it cannot check
    for claim in ("ImageNet", "imagenet", "bundled", "FID", "official", *PAPER_NUMBERS):
        assert claim not in text, claim
    assert card.data.datasets is None and "imagenet" not in card.data.tags and card.data.license == "mit"
    # an explicit card that contradicts the folder is a one-line error
    for wrong in ("b", "digits"):
        code, _, err = push("--pipeline", folder, "--repo-id", "someone/my-digits", "--license", "mit",
                            "--card", wrong, "--dry-run", tmp_path / wrong)
        assert code == 2 and err.startswith(f"error: --card {wrong} describes") and len(err.splitlines()) == 1
        assert not (tmp_path / wrong).exists()


def test_training_record_survives_a_round_trip(trained, tmp_path):
    folder, _ = trained
    pipe = SphereARPipeline.from_pretrained(folder)  # strict loading
    pipe.save_pretrained(tmp_path / "again")
    assert hub.pipeline_facts(tmp_path / "again")["training"] == hub.pipeline_facts(folder)["training"]


def test_trainer_push_to_hub_goes_through_the_publisher(trained, tmp_path):
    folder, api = trained
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_repo", "upload_folder"]  # the Trainer's own create_repo, then ours
    upload = api.calls[-1][1]
    assert upload["repo_id"] == "someone/my-digits" and upload["commit_message"] == "End of training"
    expected = hub.build_push_folder(folder, tmp_path / "dry", repo_id="someone/my-digits", license="mit")
    assert upload["files"] == files_of(expected)  # the card and the remote code, as `sphere-ar push` has them
    assert {"README.md", "remote_pipeline.py", "transformer/remote_code.py"} <= set(upload["files"])


def test_trainer_push_to_hub_needs_a_license_before_training(tmp_path, monkeypatch):
    import transformers.trainer

    from sphere_ar_hf import SphereARConfig, SphereARTransformer
    from sphere_ar_hf.training.arguments import SphereARTrainingArguments
    from sphere_ar_hf.training.trainer import SphereARTrainer

    api = FakeTrainerHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    args = SphereARTrainingArguments(output_dir=str(tmp_path), use_cpu=True, push_to_hub=True, report_to="none",
                                     hub_model_id="someone/x")
    model = SphereARTransformer(SphereARConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                               head_hidden_size=64, head_num_layers=1, head_num_adaln=1,
                                               image_size=32, patch_size=16, num_classes=10, num_class_tokens=4))
    with pytest.raises(ValueError, match="a license is required"):
        SphereARTrainer(model=model, args=args)
    assert api.calls == []  # nothing created


def test_generic_card_metrics_and_many_classes(pipeline_dir, tmp_path):
    metrics = {"features": "inception", "gen": "/home/me/samples", "ref": "/data/VIRTUAL_ref.npz", "num_gen": 5000,
               "num_ref": 10000, "fid": 12.3456, "inception_score": 45.6, "precision": 0.61, "recall": 0.42}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--metrics",
                        tmp_path / "m.json", "--dry-run", tmp_path / "out")
    assert code == 0, err
    text = (tmp_path / "out" / "README.md").read_text()
    assert "| FID | 12.35 |" in text and "| Inception Score | 45.6 |" in text and "| Recall | 0.42 |" in text
    assert "Measured by the uploader" in text and "5000 generated images" in text and "`VIRTUAL_ref.npz`" in text
    assert "/home/me" not in text and "/data/" not in text
    assert "no training record" in text  # the tiny fixture was not made by our trainer
    (tmp_path / "bad.json").write_text(json.dumps({"fid": "low"}))
    code, _, err = push("--pipeline", pipeline_dir, "--repo-id", REPO_ID, "--license", "mit", "--metrics",
                        tmp_path / "bad.json", "--dry-run", tmp_path / "bad")
    assert code == 2 and "not a `sphere-ar evaluate --json` result" in err
    # many classes: a short list and a count, no names at all: a count
    many = tmp_path / "many"
    shutil.copytree(pipeline_dir, many)
    edit_config(many, "transformer", num_classes=500)
    edit_config(many, id2label={str(i): f"class_{i}" for i in range(500)})
    text = str(hub.render_model_card(many, repo_id=REPO_ID, license="mit"))
    assert "| 19 | class_19 |" in text and "class_20 " not in text and "480 more in `model_index.json`" in text
    edit_config(many, id2label=None)
    text = str(hub.render_model_card(many, repo_id=REPO_ID, license="mit"))
    assert "500 (ids 0 to 499; model_index.json names none)" in text and "| Class id |" not in text
    assert "[0, 1],  # class ids 0-499" in text
