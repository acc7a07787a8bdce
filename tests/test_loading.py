"""Strict loading: a folder whose weights do not match its config, or whose weights file cannot be read, is a
one-line ``ValueError`` naming the component and the keys (in Python and as the CLI's ``error:`` line); dtypes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_pipeline
from sphere_ar_hf import SphereARPipeline, SphereARTransformer, SphereVAE
from sphere_ar_hf.loading import resolve_dtype
from test_cli import error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = {"transformer": "model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
PICKLES = {"transformer": "pytorch_model.bin", "vae": "diffusion_pytorch_model.bin"}
CLASSES = {"transformer": SphereARTransformer, "vae": SphereVAE}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny pipeline without the architecture record in its weights, as a folder written before the record
    existed or by another tool: the weights must show every edit here (the record: tests/test_hardening.py)."""
    out = tmp_path_factory.mktemp("strict") / "tiny"
    build_tiny_pipeline().save_pretrained(out)
    for component, name in WEIGHTS.items():
        save_file(load_file(out / component / name), out / component / name, metadata={"format": "pt"})
    return out


def variant(folder: Path, tmp_path: Path, component: str, weights: Callable[[dict], object] | None = None,
            config: Callable[[dict], object] | None = None) -> Path:
    """A copy of ``folder`` with ``component``'s weights and/or config edited in place."""
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    if weights is not None:
        path = out / component / WEIGHTS[component]
        state = load_file(path)
        weights(state)
        save_file(state, path, metadata={"format": "pt"})
    if config is not None:
        path = out / component / "config.json"
        cfg = json.loads(path.read_text())
        config(cfg)
        path.write_text(json.dumps(cfg))
    return out


def expect_refusal(pipeline_folder: Path, component: str, *needles: str) -> None:
    """Refused by the component's ``from_pretrained``, by the pipeline's, and by the CLI (exit 2, one line)."""
    cls = CLASSES[component]
    for load in (lambda: cls.from_pretrained(pipeline_folder / component),
                 lambda: cls.from_pretrained(pipeline_folder, subfolder=component),
                 lambda: SphereARPipeline.from_pretrained(pipeline_folder)):
        with pytest.raises(ValueError, match=f"cannot load {cls.__name__} from ") as info:
            load()
        message = str(info.value)
        assert "\n" not in message
        for needle in needles:
            assert needle in message, message
    code, stdout, err = run("generate", "--model", pipeline_folder, "--class-labels", "1", "--steps", "1",
                            "--output", pipeline_folder.parent / "out.png")
    line = error_line(err)
    assert code == 2 and stdout == "" and cls.__name__ in line and all(n in line for n in needles), line
    assert not (pipeline_folder.parent / "out.png").exists()


def test_exact_folder_loads_identically(folder: Path) -> None:
    pipe = SphereARPipeline.from_pretrained(folder)
    again = SphereARPipeline.from_pretrained(folder)
    for a, b in ((pipe.transformer, again.transformer), (pipe.vae, again.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    model, info = SphereARTransformer.from_pretrained(folder / "transformer", output_loading_info=True)
    assert isinstance(model, SphereARTransformer) and not info["missing_keys"] and not info["unexpected_keys"]
    vae, info = SphereVAE.from_pretrained(folder / "vae", output_loading_info=True)
    assert isinstance(vae, SphereVAE) and not info["missing_keys"]


@pytest.mark.parametrize("component, key", [("transformer", "class_embedding.weight"),
                                            ("transformer", "head.final_linear.bias"),
                                            ("vae", "decoder_conv_in.weight")])
def test_missing_weight(folder, tmp_path, component: str, key: str) -> None:
    edited = variant(folder, tmp_path, component, weights=lambda sd: sd.pop(key))
    expect_refusal(edited, component, f"missing {key}")


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_unexpected_weight(folder, tmp_path, component: str) -> None:
    edited = variant(folder, tmp_path, component, weights=lambda sd: sd.__setitem__("stray.weight", torch.zeros(3)))
    expect_refusal(edited, component, "unexpected stray.weight")


@pytest.mark.parametrize("layers, needle", [(1, "unexpected layers.1."), (3, "missing layers.2.")])
def test_layer_count_differs_from_weights(folder, tmp_path, layers: int, needle: str) -> None:
    edited = variant(folder, tmp_path, "transformer", config=lambda c: c.__setitem__("num_hidden_layers", layers))
    expect_refusal(edited, "transformer", needle)


def test_vae_layer_count_differs_from_weights(folder, tmp_path) -> None:
    edited = variant(folder, tmp_path, "vae", config=lambda c: c.__setitem__("decoder_layers", 2))
    expect_refusal(edited, "vae", "missing decoder_vit.layers.1.")


def test_mis_shaped_weight(folder, tmp_path) -> None:
    edited = variant(folder, tmp_path, "transformer", config=lambda c: c.__setitem__("head_hidden_size", 128))
    expect_refusal(edited, "transformer", "mis-shaped head.", "(weights [64")
    edited_vae = variant(folder, tmp_path / "v", "vae", config=lambda c: c.__setitem__("in_channels", 4))
    # diffusers stops at the first mis-shaped weight: one of the two convolutions that see the image channels
    expect_refusal(edited_vae, "vae", "mis-shaped ", "conv_", "3, 3], config [")


def test_ignore_mismatched_sizes_is_an_opt_in_for_shapes_only(folder, tmp_path) -> None:
    # the libraries' documented use: a new number of classes (a new class embedding) for fine-tuning
    edited = variant(folder, tmp_path, "transformer", config=lambda c: c.__setitem__("num_classes", 20))
    with pytest.raises(ValueError, match="mis-shaped class_embedding.weight"):
        SphereARTransformer.from_pretrained(edited / "transformer")
    model = SphereARTransformer.from_pretrained(edited / "transformer", ignore_mismatched_sizes=True)
    assert model.class_embedding.weight.shape[0] == 21
    trained = SphereARTransformer.from_pretrained(folder / "transformer")
    assert torch.equal(model.layers[0].attention.wqkv.weight, trained.layers[0].attention.wqkv.weight)
    # missing weights are refused still
    missing = variant(folder, tmp_path / "m", "transformer", weights=lambda sd: sd.pop("norm.weight"))
    with pytest.raises(ValueError, match="missing norm.weight"):
        SphereARTransformer.from_pretrained(missing / "transformer", ignore_mismatched_sizes=True)


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_truncated_weights_file(folder, tmp_path, component: str) -> None:
    edited = variant(folder, tmp_path, component)
    path = edited / component / WEIGHTS[component]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_refusal(edited, component, "damaged or truncated")


class _Payload:
    """A pickle that would create a file if it were ever unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("component", ["transformer", "vae"])
def test_hostile_pickle_in_a_model_folder(folder, tmp_path, component: str) -> None:
    edited = variant(folder, tmp_path, component)
    marker = tmp_path / "pwned"
    (edited / component / WEIGHTS[component]).unlink()
    torch.save({"weight": _Payload(marker)}, edited / component / PICKLES[component])
    expect_refusal(edited, component, "refused", "weights_only=True", "save the weights as safetensors", "makedirs")
    assert not marker.exists()


# ---- dtypes ------------------------------------------------------------------------------------------------------
NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
         "float16": torch.float16, "fp16": torch.float16, "torch.bfloat16": torch.bfloat16}


@pytest.mark.parametrize("name", sorted(NAMES))
@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_names_are_honoured(folder, name: str, keyword: str) -> None:
    pipe = SphereARPipeline.from_pretrained(folder, **{keyword: name})
    assert pipe.transformer.dtype == pipe.vae.dtype == NAMES[name]
    assert SphereARTransformer.from_pretrained(folder / "transformer", **{keyword: name}).dtype == NAMES[name]
    assert SphereVAE.from_pretrained(folder / "vae", **{keyword: name}).dtype == NAMES[name]


def test_auto_dtype_is_the_stored_dtype(folder, tmp_path) -> None:
    SphereARPipeline.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    pipe = SphereARPipeline.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    assert SphereVAE.from_pretrained(tmp_path / "bf16", subfolder="vae", dtype="auto").dtype == torch.bfloat16
    assert SphereARTransformer.from_pretrained(tmp_path / "bf16" / "transformer", dtype="auto").dtype == torch.bfloat16
    assert SphereARPipeline.from_pretrained(folder, dtype="auto").vae.dtype == torch.float32


def test_a_variant_in_shards_is_saved_beside_the_main_weights(tmp_path) -> None:
    """``pipe.save_pretrained(variant=..., max_shard_size=...)`` reaches both models (diffusers passes these only to a
    save method whose signature names them): the bfloat16 variant is written in shards beside the float32 weights,
    which stay byte for byte; each loads back exactly, and ``dtype="auto"`` is the dtype of the asked variant's
    files (transformers would read ``config.json``, which the variant's save rewrote)."""
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    main = {f: f.read_bytes() for f in tmp_path.rglob("*.safetensors")}
    pipe.to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16", max_shard_size="20KB")
    for component, weights in WEIGHTS.items():
        assert len(list((tmp_path / component).glob(weights.replace(".safetensors", ".bf16-*-of-*.safetensors")))) > 1
        assert (tmp_path / component / f"{weights}.index.bf16.json").is_file()
    assert {f: f.read_bytes() for f in main} == main
    for loaded, want in ((SphereARPipeline.from_pretrained(tmp_path, variant="bf16", dtype=torch.bfloat16), pipe),
                         (SphereARPipeline.from_pretrained(tmp_path, dtype=torch.float32), build_tiny_pipeline())):
        for name in WEIGHTS:
            got, expected = getattr(loaded, name).state_dict(), getattr(want, name).state_dict()
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), name
    for variant, stored in ((None, torch.float32), ("bf16", torch.bfloat16)):  # not transformer/config.json's dtype
        auto = SphereARPipeline.from_pretrained(tmp_path, dtype="auto", variant=variant)
        assert auto.transformer.dtype == auto.vae.dtype == stored, variant


def test_only_the_main_process_records_the_architecture(tmp_path) -> None:
    """transformers' ``Trainer`` calls ``save_pretrained(is_main_process=False)`` on the other ranks of a sharded
    model: they must not rewrite the files the main process writes."""
    from sphere_ar_hf.loading import ARCHITECTURE_KEY, recorded_architecture

    vae = build_tiny_pipeline().vae
    vae.save_pretrained(tmp_path)
    file = tmp_path / WEIGHTS["vae"]
    save_file(load_file(file), file, metadata={"format": "pt"})  # the weights without the record
    vae.save_pretrained(tmp_path, is_main_process=False)
    assert recorded_architecture(tmp_path) is None and ARCHITECTURE_KEY
    vae.save_pretrained(tmp_path)
    assert recorded_architecture(tmp_path)["z_channels"] == vae.config.z_channels


def test_weights_are_saved_as_safetensors_only(tmp_path) -> None:
    """A pickle can run code where it loads: the pipeline and the VAE refuse diffusers' ``safe_serialization=False``
    in one line, before writing anything (transformers 5 writes safetensors only)."""
    pipe = build_tiny_pipeline()
    for save, who in ((lambda: pipe.save_pretrained(tmp_path / "pipe", safe_serialization=False), "SphereARPipeline"),
                      (lambda: pipe.vae.save_pretrained(tmp_path / "vae", safe_serialization=False), "SphereVAE")):
        with pytest.raises(ValueError, match=f"safe_serialization=False: {who} writes safetensors only"):
            save()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_per_component(folder, keyword: str) -> None:
    """diffusers' per-component form: each model in its own dtype, names understood, ``"default"`` for the rest; a
    key that names no component, or a dtype that is not a floating one, is a one-line ``ValueError``."""
    pipe = SphereARPipeline.from_pretrained(folder, **{keyword: {"transformer": "bf16", "default": torch.float16}})
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.float16)
    pipe = SphereARPipeline.from_pretrained(folder, **{keyword: {"vae": torch.bfloat16}})
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="dtype: no component named 'transfomer'; expected keys among"):
        SphereARPipeline.from_pretrained(folder, **{keyword: {"transfomer": torch.bfloat16}})
    with pytest.raises(ValueError, match="dtype must be one of .* got torch.int8"):
        SphereARPipeline.from_pretrained(folder, **{keyword: {"vae": torch.int8}})
    for model in (SphereARTransformer.from_pretrained, SphereVAE.from_pretrained):  # a model has one dtype
        with pytest.raises(ValueError, match="dtype must be one of .* got {'vae': 'bf16'}"):
            model(folder / ("vae" if model == SphereVAE.from_pretrained else "transformer"), dtype={"vae": "bf16"})


@pytest.mark.parametrize("bad", ["float64", "bf17", "int8", torch.float64, torch.int8, 16, ""])
def test_other_dtypes_are_refused(folder, bad) -> None:
    for load in (lambda: SphereARPipeline.from_pretrained(folder, dtype=bad),
                 lambda: SphereARTransformer.from_pretrained(folder / "transformer", torch_dtype=bad),
                 lambda: SphereVAE.from_pretrained(folder / "vae", dtype=bad)):
        with pytest.raises(ValueError, match="dtype must be one of .*'bf16'.*'fp16'.*'auto'"):
            load()


def test_conflicting_dtype_keywords() -> None:
    with pytest.raises(ValueError, match="got both dtype"):
        resolve_dtype("bf16", torch.float16)
    assert resolve_dtype("bf16", torch.bfloat16) is torch.bfloat16
    assert resolve_dtype(None, "fp16") is torch.float16 and resolve_dtype() is None
