"""The pipeline's refusals of bad folders and requests: one-line errors naming what was expected, before any
large allocation; every config field and `model_index.json` entry checked at the door (the file, the field, the
value and what is expected; before, ZeroDivisionError, AttributeError, IndexError, "couldn't connect to
huggingface.co", or blamed on guidance); and quiet, true messages on float16 / bfloat16 CPU runs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sphere_ar_hf.pipeline_sphere_ar as pipeline_module
from conftest import build_tiny_pipeline
from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereVAE
from sphere_ar_hf.config_fields import ConfigFieldError
from test_cli import error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tiny_pipeline_dir) -> Path:
    return tiny_pipeline_dir


def edited(folder: Path, tmp_path: Path, file: str, edit) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    data = json.loads((out / file).read_text())
    replaced = edit(data)  # edits in place, or returns what replaces the file's content
    (out / file).write_text(json.dumps(data if replaced is None else replaced))
    return out


def refused_by_cli(model: Path, *needles: str) -> None:
    code, stdout, err = run("generate", "--model", model, "--class-labels", "1", "--steps", "1",
                            "--output", model.parent / "out.png")
    line = error_line(err)
    assert code == 2 and stdout == "" and all(n in line for n in needles), line
    assert not (model.parent / "out.png").exists()


# ---- folders --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("id2label, needle", [
    (["zero", "one"], "got list"),
    ("zero one", "got str"),
    (True, "got bool"),
    ({"zero": "0"}, "key 'zero' is not a class id"),
    ({"0": 7}, "class 0 is named 7, not a string"),
    ({"0": ["a", "b"]}, "not a string"),
])
def test_id2label_must_map_ids_to_names(folder, tmp_path, id2label, needle: str) -> None:
    model = edited(folder, tmp_path, "model_index.json", lambda d: d.__setitem__("id2label", id2label))
    expected = r"id2label \(model_index.json\) must be a mapping of class ids to names"
    with pytest.raises(ValueError, match=expected) as e:
        SphereARPipeline.from_pretrained(model)
    assert needle in str(e.value)
    refused_by_cli(model, "id2label", needle)


def test_another_scheduler_class_is_refused(folder, tmp_path) -> None:
    model = edited(folder, tmp_path, "model_index.json",
                   lambda d: d.__setitem__("scheduler", ["diffusers", "FlowMatchEulerDiscreteScheduler"]))
    with pytest.raises(TypeError, match="scheduler must be a SphereARScheduler, got FlowMatchEulerDiscreteScheduler "
                                        "\\(check the 'scheduler' entry of model_index.json\\)"):
        SphereARPipeline.from_pretrained(model)
    refused_by_cli(model, "SphereARScheduler", "FlowMatchEulerDiscreteScheduler")
    pipe = build_tiny_pipeline()
    with pytest.raises(TypeError, match="scheduler must be a SphereARScheduler"):
        SphereARPipeline(pipe.transformer, pipe.vae, FlowMatchEulerDiscreteScheduler())
    with pytest.raises(TypeError, match="transformer must be a SphereARTransformer, got SphereVAE"):
        SphereARPipeline(pipe.vae, pipe.vae, pipe.scheduler)


@pytest.mark.parametrize("guidance", ["abc", math.nan, True, None])
def test_config_guidance_scale_must_be_a_number(folder, tmp_path, guidance) -> None:
    model = edited(folder, tmp_path, "transformer/config.json", lambda d: d.__setitem__("guidance_scale", guidance))
    with pytest.raises(ValueError, match="transformer/config.json: guidance_scale: must be a (finite )?number"):
        SphereARPipeline.from_pretrained(model)
    refused_by_cli(model, "guidance_scale: must be a")


# ---- guidance ---------------------------------------------------------------------------------------------------
def test_guidance_that_overflows_is_named(tiny_pipeline) -> None:
    # finite as a Python float but not in float32: refused before sampling
    with pytest.raises(ValueError, match="guidance_scale must be a finite float32 number"):
        tiny_pipeline([0, 1], guidance_scale=1e308, num_inference_steps=2)
    # a float32 scale whose guided velocity overflows: the error names the guidance, not the decoder
    with pytest.raises(ValueError, match="guidance_scale=1e\\+37 made the guided velocity non-finite in float32; use "
                                         "a moderate scale \\(this model recommends 4.5\\)"):
        tiny_pipeline([0, 1], guidance_scale=1e37, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    # a moderate scale still samples
    tokens = tiny_pipeline([0, 1], guidance_scale=6.0, num_inference_steps=2, output_type="latent").images
    assert torch.isfinite(tokens).all()


def test_cli_guidance_overflow_is_one_line(folder, tmp_path) -> None:
    code, _, err = run("generate", "--model", folder, "--class-labels", "1", "--steps", "1", "--guidance-scale",
                       "1e308", "--output", tmp_path / "g.png")
    assert code == 2 and "guidance_scale must be a finite float32 number" in error_line(err)
    assert not (tmp_path / "g.png").exists()


# ---- bounds -----------------------------------------------------------------------------------------------------
def test_kv_cache_estimate_is_the_allocation(tiny_pipeline) -> None:
    tf = tiny_pipeline.transformer
    cache = tf.allocate_kv_cache(6)
    assert tf.kv_cache_bytes(6) == cache.nbytes
    assert tf.kv_cache_bytes(6, torch.bfloat16) * 2 == tf.kv_cache_bytes(6)


def test_a_million_labels_are_refused_before_allocating(tiny_pipeline) -> None:
    with pytest.raises(ValueError, match="1000000 images with 1 steps per token need about .* GiB of cpu memory "
                                         ".* at most \\d+ images fit in one call: pass fewer class labels per call "
                                         "\\(the CLI splits requests with --batch-size\\)"):
        tiny_pipeline([0] * 10**6, num_inference_steps=1)


def test_a_billion_steps_are_refused_before_allocating(tiny_pipeline) -> None:
    with pytest.raises(ValueError, match="even one image does not fit: use fewer num_inference_steps"):
        tiny_pipeline([0], num_inference_steps=10**9)


def test_batch_bound_follows_the_free_memory(tiny_pipeline, monkeypatch) -> None:
    pipe = tiny_pipeline
    three = pipe.sampling_bytes(3, 2, guided=True)
    assert pipe.sampling_bytes(4, 2, guided=True) > three > pipe.sampling_bytes(3, 2, guided=False)
    assert pipe.sampling_bytes(3, 2, True, "latent") < three
    monkeypatch.setattr(pipeline_module, "_free_memory", lambda device: three)
    assert pipe([0, 1, 2], num_inference_steps=2, output_type="pt").images.shape[0] == 3
    with pytest.raises(ValueError, match="4 images with 2 steps per token need .* at most 3 images fit in one call"):
        pipe([0, 1, 2, 3], num_inference_steps=2)


def test_vae_slicing_decodes_image_by_image_and_lets_a_larger_batch_fit(tiny_pipeline, monkeypatch) -> None:
    """``pipe.vae.enable_slicing()`` (diffusers' name): the decoder runs once per image, the images equal the
    batched decode's to float rounding, the memory estimate counts the decoder's activations once, and the
    refusal of a batch that fits only so names it."""
    pipe, vae = tiny_pipeline, tiny_pipeline.vae
    tokens = torch.randn(5, vae.num_tokens, vae.config.latent_dim, generator=torch.Generator().manual_seed(0))
    runs = []
    handle = vae.decoder_conv_in.register_forward_hook(lambda module, args, out: runs.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            batched = vae.decode(tokens).sample
            vae.enable_slicing()
            try:
                sliced = vae.decode(tokens, return_dict=False)[0]
                sliced_bytes = pipe.sampling_bytes(5, 2, guided=True)
            finally:
                vae.disable_slicing()
    finally:
        handle.remove()
    assert runs == [5, 1, 1, 1, 1, 1] and not vae.use_slicing
    assert (sliced - batched).abs().max() <= 1e-5 and not torch.equal(sliced, torch.zeros_like(sliced))
    full = pipe.sampling_bytes(5, 2, guided=True)
    assert full - sliced_bytes == 4 * vae.decode_bytes_per_image()
    assert pipe.sampling_bytes(5, 2, True, vae_slicing=True) == sliced_bytes
    with pytest.raises(TypeError, match="vae_slicing must be a bool or None, got str"):
        pipe.sampling_bytes(5, 2, True, vae_slicing="yes")
    monkeypatch.setattr(pipeline_module, "_free_memory", lambda device: sliced_bytes)
    with pytest.raises(ValueError, match=r"at most \d images fit in one call.*, or call pipe.vae.enable_slicing\(\)"):
        pipe([0, 1, 2, 3, 4], num_inference_steps=2)
    vae.enable_slicing()
    try:
        assert pipe([0, 1, 2, 3, 4], num_inference_steps=2, output_type="pt").images.shape[0] == 5
    finally:
        vae.disable_slicing()


def test_cli_refuses_a_batch_that_does_not_fit(folder, tmp_path, monkeypatch) -> None:
    # generate pads each call to a multiple of 8 images (batching.ROW_QUANTUM): the padded call is what must fit
    pipe = SphereARPipeline.from_pretrained(folder)
    eight = pipe.sampling_bytes(8, 1, guided=True)
    monkeypatch.setattr(pipeline_module, "_free_memory", lambda device: eight)
    argv = ("generate", "--model", folder, "--class-labels", *map(str, range(10)), "--steps", "1")
    code, _, err = run(*argv, "--batch-size", "9", "--output", tmp_path / "a.png")
    line = error_line(err)
    assert code == 2 and line.startswith("error: --batch-size 9: each call makes 16 images"), line
    assert "at most 8 images fit in one call" in line
    code, _, err = run(*argv, "--batch-size", "8", "--output", tmp_path / "b.png")
    assert code == 0, err
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "a.png").exists()


# ---- quiet, true messages ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """Collect the warnings that diffusers and transformers log (their loggers do not propagate to the root)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cpu_run_is_quiet(folder, dtype) -> None:
    with library_warnings() as messages:
        pipe = SphereARPipeline.from_pretrained(folder, dtype=dtype)
        pipe.to("cpu")
        pipe.to(dtype)
        pipe.vae.to(dtype)
        pipe.set_progress_bar_config(disable=True)
        images = pipe([1], num_inference_steps=1, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()
    assert not [m for m in messages if "kept in float32: []" in m or "cannot run with `cpu`" in m], messages
    # other warnings still get through the filter
    with library_warnings() as messages:
        logging.getLogger("diffusers.models.modeling_utils").warning("kept in float32: ['decoder']")
    assert messages == ["kept in float32: ['decoder']"]


def test_cpu_offload_without_an_accelerator(tiny_pipeline) -> None:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        pipe = build_tiny_pipeline()
        pipe.enable_model_cpu_offload()  # works where there is an accelerator
        assert pipe([0], num_inference_steps=1, output_type="pt").images.shape[0] == 1
        return
    for method in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        with pytest.raises(RuntimeError, match=f"^{method}\\(\\) moves each model to an accelerator .* this machine "
                                               "has none: run on the CPU instead \\(pipe.to\\('cpu'\\)\\)$"):
            getattr(tiny_pipeline, method)()


# ---- every config field checked at the door ----------------------------------------------------------------------
TF, VAE, SCHED, INDEX = "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json", \
    "model_index.json"


def setting(key, value):
    return lambda d: {**d, key: value}


CASES = [  # (file, edit, what the one line must say)
    (TF, setting("hidden_size", 0), "hidden_size: must be an integer from 1 to"),
    (TF, setting("num_attention_heads", 0), "num_attention_heads: must be an integer from 1"),
    (TF, setting("patch_size", 0), "patch_size: must be an integer from 1"),
    (TF, setting("num_hidden_layers", 1e9), "num_hidden_layers: must be int, got 1000000000.0 (float)"),
    (TF, setting("dtype", "abc"), "dtype: must be one of float32, bfloat16, float16, auto or null, got 'abc'"),
    (TF, setting("dtype", 0), "dtype: must be one of"),
    (TF, setting("rms_norm_eps", -1), "rms_norm_eps: must be a number in (0, 0.01]"),
    (TF, setting("rms_norm_eps", float("nan")), "rms_norm_eps: must be a number in (0, 0.01]"),
    (TF, setting("rms_norm_eps", 1e9), "rms_norm_eps: must be a number in (0, 0.01]"),
    (TF, setting("rope_theta", 0), "rope_theta: must be a number in (1, 1e7]"),
    (TF, setting("rope_theta", 1e9), "rope_theta: must be a number in (1, 1e7]"),
    (TF, setting("normalize_tokens", "yes"), "normalize_tokens: must be bool"),
    (TF, setting("class_dropout_prob", 2), "class_dropout_prob: must be a number in [0, 1]"),
    (TF, lambda d: [d], "must be a JSON object"),
    (VAE, setting("patch_size", 0), "patch_size: must be an integer from 1"),
    (VAE, setting("rope_theta", -1), "rope_theta: must be a number in (1, 1e7]"),
    (VAE, setting("rope_theta", 1e9), "rope_theta: must be a number in (1, 1e7]"),
    (VAE, setting("rms_norm_eps", 1e9), "rms_norm_eps: must be a number in (0, 0.01]"),
    (VAE, setting("cnn_channels", []), "cnn_channels: must be a non-empty list"),
    (VAE, lambda d: [d], "must be a JSON object"),
    (SCHED, setting("num_inference_steps", -3), "num_inference_steps: must be an integer from 1"),
    (SCHED, setting("time_shift", "x"), "time_shift: must be a number, got 'x'"),
    (SCHED, lambda d: [d], "must be a JSON object"),
]


@pytest.mark.parametrize(("file", "edit", "needle"), CASES, ids=[f"{c[0].split('/')[0]}-{c[2][:28]}" for c in CASES])
def test_a_bad_field_is_named_with_its_file(folder, tmp_path, file, edit, needle) -> None:
    model = edited(folder, tmp_path, file, edit)
    with pytest.raises(ConfigFieldError) as info:
        SphereARPipeline.from_pretrained(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{model}/{file}: ") and needle in message, message
    code, stdout, err = run("generate", "--model", model, "--class-labels", "1", "--steps", "1",
                            "--output", tmp_path / "out.png")
    line = error_line(err)
    assert code == 2 and needle in line and file in line, line


@pytest.mark.parametrize("entry", [[], ["sphere_ar_hf.vae"], [1, 2], "SphereVAE"])
def test_a_bad_component_entry_is_named(folder, tmp_path, entry) -> None:
    model = edited(folder, tmp_path, INDEX, setting("vae", entry))
    with pytest.raises(ValueError, match=r"model_index.json: vae must be \[library, class name\]"):
        SphereARPipeline.from_pretrained(model)


def test_the_sizes_must_fit_together(folder, tmp_path) -> None:
    with pytest.raises(ConfigFieldError, match="^hidden_size 64 / num_attention_heads 3 must give"):
        SphereARConfig(hidden_size=64, num_attention_heads=3)
    model = edited(folder, tmp_path, TF, setting("num_attention_heads", 3))  # a folder: its weights' record says
    with pytest.raises(ConfigFieldError, match=f"{TF}: num_attention_heads is 3 but the weights were saved with"):
        SphereARPipeline.from_pretrained(model)


def test_configs_built_in_python_are_checked_too() -> None:
    with pytest.raises(ConfigFieldError, match="^hidden_size: must be an integer"):
        SphereARConfig(hidden_size=-4)
    with pytest.raises(ConfigFieldError, match="^z_channels: must be int, got '8' .str.$"):
        SphereVAE(z_channels="8")
    with pytest.raises(ConfigFieldError, match="^last_step_size: must be a number in"):
        SphereARScheduler(last_step_size=3.0)
    SphereARConfig(guidance_scale=2, rope_theta=10000)  # integers where numbers are expected are fine


# ---- no silent wrong load: weights -------------------------------------------------------------------------------
def with_weights(folder: Path, tmp_path: Path, file: str, edit) -> Path:
    """A copy of ``folder`` whose safetensors ``file`` holds ``edit(weights)``."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "weights"
    shutil.copytree(folder, out)
    weights = load_file(out / file)
    save_file(edit(weights), out / file, metadata={"format": "pt"})
    return out


VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"


def test_integer_weights_are_refused(folder, tmp_path) -> None:
    model = with_weights(folder, tmp_path, VAE_WEIGHTS, lambda w: {k: v.to(torch.int8) for k, v in w.items()})
    with pytest.raises(ValueError, match="cannot load SphereVAE from .*vae: .* weights are not stored as floating "
                                         r"point \(diffusion_pytorch_model.safetensors: .* \(I8\)"):
        SphereARPipeline.from_pretrained(model)


@pytest.mark.parametrize("file", [VAE_WEIGHTS, "transformer/model.safetensors"])
def test_nan_weights_are_named_as_nan_weights(folder, tmp_path, file) -> None:
    def poison(w):
        key = sorted(w)[0]
        w[key] = w[key].clone().fill_(float("nan"))
        return w

    model = with_weights(folder, tmp_path, file, poison)
    with pytest.raises(ValueError, match=r"1 weights hold NaN or infinite values \(.+\); the file is damaged"):
        SphereARPipeline.from_pretrained(model)
    code, _, err = run("generate", "--model", model, "--class-labels", "1", "--steps", "1",
                       "--output", tmp_path / "out.png")
    assert code == 2 and "NaN or infinite" in error_line(err) and "guidance" not in err


def test_a_constant_decoded_batch_names_the_vae(folder, tmp_path) -> None:
    model = with_weights(folder, tmp_path, VAE_WEIGHTS,
                         lambda w: {**w, "decoder_conv_out.weight": torch.zeros_like(w["decoder_conv_out.weight"])})
    pipe = SphereARPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="the VAE decoded every image to the constant value .*decoder weights are "
                                         "broken"):
        pipe([1, 2], num_inference_steps=2, output_type="np")
    assert pipe([1, 2], num_inference_steps=2, output_type="latent").images.shape[0] == 2  # the tokens are fine


# ---- no silent wrong load: what weight shapes cannot show ---------------------------------------------------------
@pytest.mark.parametrize(("file", "key", "value"), [
    (TF, "num_attention_heads", 4), (TF, "rms_norm_eps", 1e-5), (TF, "rope_theta", 1000.0),
    (VAE, "num_attention_heads", 4), (VAE, "rms_norm_eps", 1e-5), (VAE, "rope_theta", 20000.0)])
def test_an_edited_architecture_field_is_refused(folder, tmp_path, file, key, value) -> None:
    """In range and shape-compatible, so only the record written with the weights shows the edit (images off by
    up to 0.74 before)."""
    model = edited(folder, tmp_path, file, setting(key, value))
    with pytest.raises(ConfigFieldError, match=f"{file}: {key} is {value!r} but the weights were saved with {key}="):
        SphereARPipeline.from_pretrained(model)


def test_folders_without_the_record_still_load(folder, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from sphere_ar_hf.loading import ARCHITECTURE_KEY, recorded_architecture

    model = tmp_path / "old"
    shutil.copytree(folder, model)
    assert recorded_architecture(model / "transformer")["num_attention_heads"] == 2
    for file in ("transformer/model.safetensors", VAE_WEIGHTS):  # as written before the record existed
        save_file(load_file(model / file), model / file, metadata={"format": "pt"})
    assert recorded_architecture(model / "transformer") is None and ARCHITECTURE_KEY
    pipe = SphereARPipeline.from_pretrained(model)
    reference = SphereARPipeline.from_pretrained(folder)
    for a, b in zip(pipe.transformer.state_dict().values(), reference.transformer.state_dict().values()):
        assert torch.equal(a, b)
