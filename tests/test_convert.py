"""`sphere-ar convert` on the official-format tiny fixture (../shared/fixtures/official-tiny): the folder it
writes, the weights it picks, and a one-line `error: ...` with exit status 2 for every bad input."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import io
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sphere_ar_hf import SphereARPipeline, convert_official_checkpoint, imagenet_id2label
from sphere_ar_hf.cli import main
from sphere_ar_hf.official_checkpoint import AR_KEY_RULES, VAE_KEY_RULES, rename_key

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official-tiny"
AR, VAE = FIXTURE / "ar.pt", FIXTURE / "vae.pt"
assert AR.is_file() and VAE.is_file(), f"missing the fixture {FIXTURE} (CI puts ../shared beside the repo)"


def run(*argv: str | Path) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(AR, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("convert") / "sphere-ar-tiny"
    code, stdout, err = run("convert", "--checkpoint", AR, "--output", out)
    assert code == 0, err
    return out, stdout


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "model.safetensors")


def vae_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")


# ---- what a conversion writes ---------------------------------------------------------------------------------
def test_writes_a_safetensors_pipeline_folder(converted) -> None:
    out, stdout = converted
    assert (out / "model_index.json").is_file()
    for sub in ("transformer", "vae", "scheduler"):
        assert (out / sub).is_dir()
        assert (out / sub / ("scheduler_config.json" if sub == "scheduler" else "config.json")).is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix not in (".json",)]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    # one summary line: sizes, classes, which weights
    assert stdout.count("\n") == 1
    assert "64x64" in stdout and "1000 classes" in stdout and "ema weights" in stdout and "parameters" in stdout


def test_id2label_survives_from_pretrained(converted) -> None:
    out, _ = converted
    index = json.loads((out / "model_index.json").read_text())
    assert len(index["id2label"]) == 1000
    pipe = SphereARPipeline.from_pretrained(out)
    assert pipe.id2label == imagenet_id2label()
    assert pipe.id2label[207] == "golden retriever"
    assert pipe.get_label_ids(["golden retriever", "Tinca tinca", 360]) == [207, 0, 360]
    assert pipe.transformer.config.image_size == 64 and pipe.transformer.config.num_classes == 1000


def test_default_is_ema_and_no_ema_takes_model(converted, ckpt, tmp_path) -> None:
    out, _ = converted
    assert not torch.equal(ckpt["ema"]["proj_in.weight"], ckpt["model"]["proj_in.weight"])  # the fixture's premise
    ema = transformer_weights(out)
    assert torch.equal(ema["proj_in.weight"], ckpt["ema"]["proj_in.weight"])
    assert torch.equal(ema["head.adaln.0.weight"], ckpt["ema"]["head.net.ada_ln_blocks.0.weight"])

    code, stdout, err = run("convert", "--checkpoint", AR, "--output", tmp_path / "raw", "--no-ema")
    assert code == 0, err
    assert "model weights" in stdout
    raw = transformer_weights(tmp_path / "raw")
    assert torch.equal(raw["proj_in.weight"], ckpt["model"]["proj_in.weight"])
    assert torch.equal(raw["head.adaln.0.weight"], ckpt["model"]["head.net.ada_ln_blocks.0.weight"])
    assert set(raw) == set(ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_vae_checkpoint_replaces_the_vae_weights(converted, tmp_path) -> None:
    out, _ = converted
    with torch.serialization.safe_globals([argparse.Namespace]):
        vae_ckpt = torch.load(VAE, map_location="cpu", weights_only=True)
    vae_ckpt["model"]["vae.quant_proj.bias"] = vae_ckpt["model"]["vae.quant_proj.bias"] + 1.0
    changed = tmp_path / "vae.pt"
    torch.save(vae_ckpt, changed)
    code, _, err = run("convert", "--checkpoint", AR, "--vae-checkpoint", changed, "--output", tmp_path / "a")
    assert code == 0, err
    got, before = vae_weights(tmp_path / "a"), vae_weights(out)
    assert torch.equal(got["quant_proj.bias"], vae_ckpt["model"]["vae.quant_proj.bias"])
    assert torch.allclose(got["quant_proj.bias"], before["quant_proj.bias"] + 1.0)
    assert torch.equal(got["decoder_conv_out.weight"], before["decoder_conv_out.weight"])
    # the unchanged official vae.pt gives the same VAE as the one inside ar.pt
    code, _, err = run("convert", "--checkpoint", AR, "--vae-checkpoint", VAE, "--output", tmp_path / "b")
    assert code == 0, err
    same = vae_weights(tmp_path / "b")
    assert all(torch.equal(same[k], before[k]) for k in before)


def test_bare_state_dict(converted, ckpt, tmp_path) -> None:
    out, _ = converted
    bare = tmp_path / "bare.pt"
    torch.save(ckpt["ema"], bare)
    code, stdout, err = run("convert", "--checkpoint", bare, "--output", tmp_path / "bare")
    assert code == 0, err
    assert "state dict weights" in stdout
    got, want = transformer_weights(tmp_path / "bare"), transformer_weights(out)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_overwrite_replaces_an_earlier_pipeline_folder_only(converted, tmp_path) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted[0], out)
    (out / "model_index.json").write_text((out / "model_index.json").read_text().replace("\n", "\n\n"))
    code, _, err = run("convert", "--checkpoint", AR, "--output", out, "--overwrite")
    assert code == 0, err
    assert (out / "model_index.json").read_bytes() == (converted[0] / "model_index.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a folder with anything else in it (tests/test_output_folders.py has the other cases) is refused
    (out / "old.txt").write_text("old")
    code, _, err = run("convert", "--checkpoint", AR, "--output", out, "--overwrite")
    assert_one_line_error(code, err, "refusing to replace", "not a pipeline folder (it holds old.txt)")
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- every bad input: `error: <one line>`, exit status 2, nothing written -------------------------------------
def _with_ema(ckpt: dict, **changes) -> dict:
    ema = dict(ckpt["ema"])
    for key, value in changes.items():
        if value is None:
            del ema[key]
        else:
            ema[key] = value
    return {"ema": ema, "epochs": 1, "args": ckpt["args"]}


BAD_CHECKPOINTS = {
    "empty": (lambda ck, p: p.write_bytes(b""), ["empty"]),
    "truncated": (lambda ck, p: p.write_bytes(AR.read_bytes()[: AR.stat().st_size // 2]), ["truncated or corrupt"]),
    "not-a-checkpoint": (lambda ck, p: p.write_bytes(b"hello, this is not a torch file"), ["not a readable"]),
    "no-weights": (lambda ck, p: torch.save({"epochs": 1}, p), ["no weights", "epochs"]),
    "not-a-dict": (lambda ck, p: torch.save(torch.zeros(3), p), ["expected a dict", "Tensor"]),
    "missing-trunk-key": (lambda ck, p: torch.save(_with_ema(ck, **{"layers.0.attention_norm.weight": None}), p),
                          ["missing key", "layers.0.attention_norm.weight"]),
    # reported by the official name, not the converted one
    "missing-head-key": (lambda ck, p: torch.save(_with_ema(ck, **{"head.net.ada_ln_blocks.0.weight": None}), p),
                         ["missing key", "head.net.ada_ln_blocks.0.weight"]),
    "missing-vae-key": (lambda ck, p: torch.save(_with_ema(ck, **{"vae.decoder.conv_out.2.weight": None}), p),
                        ["missing key", "vae.decoder.conv_out.2.weight"]),
    "missing-inferred-key": (lambda ck, p: torch.save(_with_ema(ck, **{"proj_in.weight": None}), p),
                             ["missing key", "proj_in.weight"]),
    "unexpected-key": (lambda ck, p: torch.save(_with_ema(ck, **{"extra.weight": torch.zeros(2)}), p),
                       ["unexpected key", "extra.weight"]),
    "unexpected-vae-key": (lambda ck, p: torch.save(_with_ema(ck, **{"vae.encoder.extra": torch.zeros(2)}), p),
                           ["unexpected key", "vae.encoder.extra"]),
    "mis-shaped-key": (lambda ck, p: torch.save(_with_ema(ck, **{"layers.1.attention.wo.weight": torch.zeros(3, 3)}),
                                                p), ["layers.1.attention.wo.weight", "shape (3, 3)", "(128, 128)"]),
    "mis-shaped-head-key": (lambda ck, p: torch.save(_with_ema(ck, **{"head.net.final_layer.linear.bias":
                                                                       torch.zeros(5)}), p),
                            ["head.net.final_layer.linear.bias", "shape (5,)", "(16,)"]),
    "vae-only": (lambda ck, p: p.write_bytes(VAE.read_bytes()), ["only S-VAE weights", "--vae-checkpoint"]),
    # official args name the preset: weights that do not fit it (here: far too small) are refused
    "not-the-named-preset": (lambda ck, p: torch.save({"ema": ck["ema"], "args": argparse.Namespace(
        **{**vars(ck["args"]), "model": "SphereAR-B"})}, p), ["args say SphereAR-B", "num_hidden_layers=2"]),
    # args fields of the wrong type (a tensor in vae_only made `if ...` raise "Boolean value of Tensor ...")
    "args-tensor-vae-only": (lambda ck, p: torch.save({"ema": ck["ema"], "args": argparse.Namespace(
        **{**vars(ck["args"]), "vae_only": torch.zeros(3)})}, p), ["args.vae_only holds a Tensor", "true or false"]),
    "args-tensor-model": (lambda ck, p: torch.save({"ema": ck["ema"], "args": argparse.Namespace(
        **{**vars(ck["args"]), "model": torch.zeros(2)})}, p), ["args.model holds a Tensor", "model name"]),
    "args-list-vae-only": (lambda ck, p: torch.save({"ema": ck["ema"], "args": argparse.Namespace(
        **{**vars(ck["args"]), "vae_only": [1]})}, p), ["args.vae_only holds a list"]),
    # a stride-0 view: the right shape from 2048 stored numbers (every class row the same) is refused too
    "stride-0-weight": (lambda ck, p: torch.save(_with_ema(ck, **{"cls_embedding.weight": torch.zeros(2048).as_strided(
        (1001, 2048), (0, 1))}), p), ["ema/cls_embedding.weight", "claims shape (1001, 2048)", "strides (0, 1)",
                                      "8.2 kB of stored data", "the file is"]),
}


_CONVERT_IN_A_BOX = """
import sys
import sphere_ar_hf.official_checkpoint
from sphere_ar_hf.cli import main
if sys.argv[1] == "no-guard":  # the converter as it was: no tensor-size check
    sphere_ar_hf.official_checkpoint._check_tensor_sizes = lambda *args, **kwargs: None
sys.exit(main(sys.argv[2:]))
"""
_ADDRESS_SPACE = 16 * 2**30  # a broken guard fails the test (allocation error) instead of taking the memory


def _convert_in_a_box(mode: str, *argv: str | Path) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE, _ADDRESS_SPACE))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", _CONVERT_IN_A_BOX, mode, *map(str, argv)], capture_output=True,
                          text=True, env=env, preexec_fn=limit, timeout=300)


def test_huge_stride_0_claim_is_refused_before_allocating(ckpt, tmp_path) -> None:
    """A (6.1M, 2048) class embedding from 2048 stored numbers (stride 0): 50 GB claimed by a ~10 MB file. The
    converter sized the model by it and allocated the 50 GB (the issue's (1e9, 2048) claim: 8 TB); now it refuses."""
    rows = 6_100_001
    bad = tmp_path / "huge.pt"
    torch.save(_with_ema(ckpt, **{"cls_embedding.weight": torch.zeros(2048).as_strided((rows, 2048), (0, 1))}), bad)
    assert bad.stat().st_size < 20e6
    out = tmp_path / "out"
    proc = _convert_in_a_box("guard", "convert", "--checkpoint", bad, "--output", out)
    assert_one_line_error(proc.returncode, proc.stderr, str(bad), f"claims shape ({rows}, 2048)", "50.0 GB",
                          "strides (0, 1)", "the file is")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.pt"]
    # without the guard, the inferred config is refused before the model is built: 6.1M classes are out of range
    proc = _convert_in_a_box("no-guard", "convert", "--checkpoint", bad, "--output", out)
    assert_one_line_error(proc.returncode, proc.stderr, "num_classes: must be an integer from 1 to 1048576",
                          str(rows - 1))


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint(case: str, ckpt, tmp_path) -> None:
    make, needles = BAD_CHECKPOINTS[case]
    bad = tmp_path / f"{case}.pt"
    make(ckpt, bad)
    out = tmp_path / "out"
    code, stdout, err = run("convert", "--checkpoint", bad, "--output", out)
    assert_one_line_error(code, err, str(bad), *needles)
    assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name], "something was written"


def test_missing_checkpoint_file(tmp_path) -> None:
    code, _, err = run("convert", "--checkpoint", tmp_path / "nope.pt", "--output", tmp_path / "out")
    assert_one_line_error(code, err, "nope.pt", "no such file")
    code, _, err = run("convert", "--checkpoint", tmp_path, "--output", tmp_path / "out")
    assert_one_line_error(code, err, "is a directory")


def test_no_ema_on_an_ema_only_checkpoint(ckpt, tmp_path) -> None:
    ema_only = tmp_path / "ema_only.pt"
    torch.save({"ema": ckpt["ema"], "epochs": 1, "args": ckpt["args"]}, ema_only)
    code, _, err = run("convert", "--checkpoint", ema_only, "--output", tmp_path / "out", "--no-ema")
    assert_one_line_error(code, err, "--no-ema", "only has 'ema'")
    assert not (tmp_path / "out").exists()
    code, _, err = run("convert", "--checkpoint", ema_only, "--output", tmp_path / "out")  # fine without --no-ema
    assert code == 0, err


def test_bad_vae_checkpoint(tmp_path) -> None:
    bad = tmp_path / "vae.pt"
    bad.write_bytes(VAE.read_bytes()[:1000])
    code, _, err = run("convert", "--checkpoint", AR, "--vae-checkpoint", bad, "--output", tmp_path / "out")
    assert_one_line_error(code, err, str(bad), "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_replaced(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run("convert", "--checkpoint", AR, "--output", out)
    assert_one_line_error(code, err, str(out), "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run("convert", "--checkpoint", AR, "--output", a_file, "--overwrite")
    assert_one_line_error(code, err, "not a directory")


def test_bad_head_count(tmp_path) -> None:
    code, _, err = run("convert", "--checkpoint", AR, "--output", tmp_path / "out", "--num-heads", "3")
    assert_one_line_error(code, err, "not divisible by 3")
    assert not (tmp_path / "out").exists()


class _RunsCode:
    """Unpickling this calls ``exec``: it writes ``marker`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_running_pickle_is_refused(writer: str, ckpt, tmp_path) -> None:
    def write(path: Path, marker: Path) -> None:
        payload = {"hook": _RunsCode(marker), "ema": dict(ckpt["ema"]), "epochs": 1}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=2)

    # the payload is live: an unsafe load does run it
    live, live_marker = tmp_path / "live.pt", tmp_path / "LIVE_MARKER"
    write(live, live_marker)
    if writer == "torch.save":
        torch.load(live, weights_only=False)
    else:
        with open(live, "rb") as f:
            pickle.load(f)
    assert live_marker.read_text() == "code ran"

    evil, marker = tmp_path / "evil.pt", tmp_path / "MARKER"
    write(evil, marker)
    code, _, err = run("convert", "--checkpoint", evil, "--output", tmp_path / "out")
    assert_one_line_error(code, err, str(evil), "refused", "exec")
    assert not marker.exists(), "the checkpoint ran code"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_interrupted_conversion_leaves_nothing(failure, tmp_path, monkeypatch) -> None:
    original = SphereARPipeline.save_pretrained

    def save_then_fail(self, save_directory, **kwargs):
        original(self, save_directory, **kwargs)  # a complete folder in the temporary place ...
        (Path(save_directory) / "partial.bin").write_bytes(b"x")
        raise failure(28, "No space left on device") if failure is OSError else failure()  # ... then failure

    monkeypatch.setattr(SphereARPipeline, "save_pretrained", save_then_fail)
    out = tmp_path / "out"
    code, _, err = run("convert", "--checkpoint", AR, "--output", out)
    if failure is KeyboardInterrupt:
        assert code == 130 and "interrupted" in err and "Traceback" not in err
    else:
        assert_one_line_error(code, err, "No space left on device")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "temporary folders left behind"
    # the library call cleans up the same way
    with pytest.raises(failure):
        convert_official_checkpoint(AR, out)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(converted, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(converted[0], out)
    index = {**json.loads((out / "model_index.json").read_text()), "_old": True}  # tells the old folder apart
    (out / "model_index.json").write_text(json.dumps(index))

    def fail(self, save_directory, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SphereARPipeline, "save_pretrained", fail)
    code, _, err = run("convert", "--checkpoint", AR, "--output", out, "--overwrite")
    assert_one_line_error(code, err, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert json.loads((out / "model_index.json").read_text()) == index


def test_key_renaming_round_trips(ckpt) -> None:
    """Every official key maps to one of ours and back (the way back names missing keys in error messages)."""
    for key in ckpt["ema"]:
        rules, name = (VAE_KEY_RULES, key[4:]) if key.startswith("vae.") else (AR_KEY_RULES, key)
        if name in ("encoder.freqs_cis", "decoder.freqs_cis"):
            continue
        ours = rename_key(name, rules)
        assert ours is not None, key
        assert rename_key(ours, rules, reverse=True) == name, (key, ours)
