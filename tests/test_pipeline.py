"""SphereARPipeline on a tiny random model: outputs, seeding, guidance, labels, save/load, precision, errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import PIL.Image
import pytest
import torch

from sphere_ar_hf import SphereARPipeline

STEPS = 3  # sampler steps per token: keeps every call cheap


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(pipe: SphereARPipeline, labels, seed: int | None = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "pt")
    if seed is not None:
        kwargs.setdefault("generator", _gen(seed))
    return pipe(labels, **kwargs).images


# ----------------------------------------------------------------------------- outputs


def test_output_types(tiny_pipeline: SphereARPipeline) -> None:
    pt = _run(tiny_pipeline, [0, 3], output_type="pt")
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 32) and pt.dtype == torch.float32
    assert pt.min() >= 0 and pt.max() <= 1 and pt.std() > 1e-3

    arr = _run(tiny_pipeline, [0, 3], output_type="np")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 3)
    assert arr.min() >= 0 and arr.max() <= 1
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6, rtol=0)

    pil = _run(tiny_pipeline, [0, 3], output_type="pil")
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    assert np.abs(np.asarray(pil[1], dtype=np.float32) / 255 - arr[1]).max() <= 1 / 255 + 1e-6

    latents = _run(tiny_pipeline, [0, 3], output_type="latent")
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, 4, 16)
    assert (latents.norm(dim=-1) - 4.0).abs().max() <= 1e-4  # on the radius-sqrt(latent_dim) sphere
    with torch.no_grad():
        decoded = (tiny_pipeline.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, pt, atol=1e-5, rtol=0)  # the images are the decoded latents

    (tup,) = tiny_pipeline([0, 3], num_inference_steps=STEPS, generator=_gen(0), output_type="pt", return_dict=False)
    assert torch.equal(tup, pt)


def test_progress_bar_can_be_disabled(make_pipeline, capsys) -> None:
    pipe = make_pipeline()
    pipe.set_progress_bar_config(disable=False)
    _run(pipe, [1])
    shown = capsys.readouterr().err
    assert "4/4" in shown  # one update per token
    pipe.set_progress_bar_config(disable=True)
    _run(pipe, [1])
    assert "4/4" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- seeding


def test_same_seed_reproduces(tiny_pipeline: SphereARPipeline) -> None:
    a = _run(tiny_pipeline, [2, 5], seed=11)
    b = _run(tiny_pipeline, [2, 5], seed=11)
    c = _run(tiny_pipeline, [2, 5], seed=12)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_generator_list_makes_images_independent_of_batch(tiny_pipeline: SphereARPipeline, guidance: float,
                                                          schedule: str) -> None:
    kw = dict(guidance_scale=guidance, cfg_schedule=schedule, seed=None)
    pair = _run(tiny_pipeline, [3, 5], generator=[_gen(1), _gen(2)], **kw)
    alone = _run(tiny_pipeline, [5], generator=[_gen(2)], **kw)
    # measured ~2e-6 (batched matmul rounding); anything shared between the images would be >= 1e-2
    assert (pair[1] - alone[0]).abs().max() <= 5e-5
    first = _run(tiny_pipeline, [3], generator=[_gen(1)], **kw)
    assert (pair[0] - first[0]).abs().max() <= 5e-5
    # and the generators matter
    other = _run(tiny_pipeline, [5], generator=[_gen(3)], **kw)
    assert (other[0] - alone[0]).abs().max() > 1e-2


def test_two_threads_share_one_pipeline(make_pipeline) -> None:
    """A call keeps its state to itself: two threads sampling with one pipeline at once (other step counts, samplers'
    state, guidance and generator kinds) get, bit for bit, the images each gets alone."""
    pipe = make_pipeline(seed=3)
    jobs = [dict(class_labels=[1, 2, 3], guidance_scale=3.0, num_inference_steps=4, generator=lambda: _gen(0)),
            dict(class_labels=[5, 9], guidance_scale=1.0, num_inference_steps=7,
                 generator=lambda: [_gen(1), _gen(2)])]

    def run(job: dict) -> torch.Tensor:
        return pipe(**{**job, "generator": job["generator"]()}, output_type="latent").images

    steps_before = pipe.scheduler.num_inference_steps
    alone = [run(job) for job in jobs]
    start, results = threading.Barrier(len(jobs)), [[] for _ in jobs]

    def worker(j: int) -> None:
        start.wait()
        for _ in range(3):
            results[j].append(run(jobs[j]))

    threads = [threading.Thread(target=worker, args=(j,)) for j in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for j, runs in enumerate(results):
        assert len(runs) == 3 and all(torch.equal(r, alone[j]) for r in runs), f"job {j} changed beside another"
    assert pipe.scheduler.num_inference_steps == steps_before  # the pipeline's own scheduler is left as it was


# ----------------------------------------------------------------------------- guidance


def test_guidance_none_uses_model_config(make_pipeline) -> None:
    pipe = make_pipeline()
    pipe.transformer.config.guidance_scale = 2.5
    default = _run(pipe, [4], guidance_scale=None)
    assert torch.equal(default, _run(pipe, [4], guidance_scale=2.5))
    assert (default - _run(pipe, [4], guidance_scale=4.5)).abs().max() > 1e-3
    assert torch.equal(_run(pipe, [4]), default)  # the default argument is None


def test_guidance_enabled_only_above_one(tiny_pipeline: SphereARPipeline) -> None:
    off = _run(tiny_pipeline, [6], guidance_scale=1.0, cfg_schedule="constant")
    assert torch.equal(off, _run(tiny_pipeline, [6], guidance_scale=0.5, cfg_schedule="constant"))
    on = _run(tiny_pipeline, [6], guidance_scale=4.0, cfg_schedule="constant")
    assert (on - off).abs().max() > 1e-2
    linear = _run(tiny_pipeline, [6], guidance_scale=4.0, cfg_schedule="linear")
    assert (on - linear).abs().max() > 1e-3  # the schedule matters


# ----------------------------------------------------------------------------- labels


def test_class_names_and_synonyms(tiny_pipeline: SphereARPipeline) -> None:
    assert tiny_pipeline.get_label_ids(["nil", "Zero", "zero, nil", " ONE ", 3, "4"]) == [0, 0, 0, 1, 3, 4]
    assert tiny_pipeline.get_label_ids("seven") == [7]
    assert tiny_pipeline.get_label_ids(torch.tensor([9, 8])) == [9, 8]
    assert tiny_pipeline.labels["nil"] == 0
    by_name = _run(tiny_pipeline, ["nil", "two"])
    assert torch.equal(by_name, _run(tiny_pipeline, [0, 2]))
    assert (by_name[0] - _run(tiny_pipeline, [1, 2])[0]).abs().max() > 1e-3  # the class matters


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tiny_pipeline: SphereARPipeline, tiny_id2label, tmp_path) -> None:
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = SphereARPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    # weights in allocator-aligned memory, not views of the file at 8-byte offsets (MKL rounds one-row products
    # differently for those: the images would differ at batch 1)
    for model in (loaded.transformer, loaded.vae):
        assert all(p.data_ptr() % 64 == 0 for p in model.parameters())
    assert loaded.id2label == tiny_id2label and all(type(k) is int for k in loaded.id2label)
    assert loaded.get_label_ids("nil") == [0]
    assert loaded.transformer.config.to_dict() == tiny_pipeline.transformer.config.to_dict() | {
        "_name_or_path": loaded.transformer.config._name_or_path}
    for labels, kw in [([0, 7], {}), (["one"], dict(guidance_scale=1.0))]:
        assert torch.equal(_run(loaded, labels, **kw), _run(tiny_pipeline, labels, **kw))


# ----------------------------------------------------------------------------- precision / compile


def test_bfloat16_pipeline(make_pipeline) -> None:
    pipe = make_pipeline().to(torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    images = _run(pipe, [0, 5])
    assert images.shape == (2, 3, 32, 32) and bool(torch.isfinite(images).all())
    assert images.min() >= 0 and images.max() <= 1
    latents = _run(pipe, [0, 5], output_type="latent")
    assert bool(torch.isfinite(latents).all())
    assert (latents.float().norm(dim=-1) - 4.0).abs().max() <= 1e-2


def test_to_takes_dtype_and_device_keywords_only(make_pipeline) -> None:
    """``to(dtype=..., device=...)`` as diffusers takes them; ``torch_dtype=`` (from_pretrained's old name), which
    diffusers would ignore silently, is a one-line ``TypeError``."""
    pipe = make_pipeline().to(device="cpu", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"to\(\) got unexpected keyword arguments \['torch_dtype'\]: expected dtype="):
        pipe.to(torch_dtype=torch.float32)
    assert pipe.transformer.dtype == torch.bfloat16


def test_torch_compile_gives_same_images(make_pipeline) -> None:
    pipe = make_pipeline()
    ref = _run(pipe, [1, 8], guidance_scale=3.0)
    torch._dynamo.reset()
    try:
        graphs = []

        def counting_backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        pipe.enable_torch_compile(backend=counting_backend)
        torch.testing.assert_close(_run(pipe, [1, 8], guidance_scale=3.0), ref, atol=1e-6, rtol=0)
        assert graphs, "enable_torch_compile did not route the sampler through torch.compile"

        torch._dynamo.reset()
        pipe.enable_torch_compile(backend="eager")
        torch.testing.assert_close(_run(pipe, [1, 8], guidance_scale=3.0), ref, atol=1e-6, rtol=0)
        pipe.disable_torch_compile()
        assert torch.equal(_run(pipe, [1, 8], guidance_scale=3.0), ref)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (10, ValueError, r"class id 10 is out of range; valid class ids are 0\.\.9.*id 10 is the null"),
        ([1, 10], ValueError, r"labels\[1\]: class id 10 is out of range"),
        (-1, ValueError, r"class id -1 is out of range; valid class ids are 0\.\.9"),
        ("eleven", ValueError, r"unknown class name 'eleven'"),
        ([], ValueError, r"empty list; pass at least one class label"),
        (1.5, TypeError, r"class labels must be an int, a str"),
        ([2.0], TypeError, r"class labels must be an int, a str"),
        (True, TypeError, r"bool is not a valid class label"),
        ([0, False], TypeError, r"bool is not a valid class label"),
        (torch.tensor([1.0]), TypeError, r"class labels must be an int, a str.*dtype torch.float32"),
    ],
)
def test_bad_labels(tiny_pipeline: SphereARPipeline, labels, error, match: str) -> None:
    with pytest.raises(error, match=match):
        _run(tiny_pipeline, labels)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_inference_steps=0), ValueError, r"num_inference_steps must be an integer >= 1, got 0"),
        (dict(num_inference_steps=1.5), ValueError, r"num_inference_steps must be an integer >= 1, got 1\.5"),
        (dict(num_inference_steps=True), ValueError, r"num_inference_steps must be an integer >= 1"),
        (dict(guidance_scale=math.nan), ValueError, r"guidance_scale must be a finite float32 number .*got nan"),
        (dict(guidance_scale=math.inf), ValueError, r"guidance_scale must be a finite float32 number .*got inf"),
        (dict(guidance_scale=-math.inf), ValueError, r"guidance_scale must be a finite float32 number"),
        (dict(guidance_scale=1e308), ValueError, r"guidance_scale must be a finite float32 number .*got 1e\+308"),
        (dict(guidance_scale="4"), TypeError, r"guidance_scale must be a float"),
        (dict(cfg_schedule="cosine"), ValueError, r"cfg_schedule must be one of .*'linear'.*got 'cosine'"),
        (dict(output_type="jpeg"), ValueError, r"output_type must be one of .*'pil'.*'latent'.*got 'jpeg'"),
        (dict(generator=[torch.Generator()]), ValueError, r"1 generators for 2 images.*one generator per image"),
        (dict(generator=[torch.Generator()] * 3), ValueError, r"list of 3 generators for 2 images"),
        (dict(generator=0), TypeError, r"generator must be a torch.Generator"),
    ],
)
def test_bad_call_arguments(tiny_pipeline: SphereARPipeline, kwargs: dict, error, match: str) -> None:
    kwargs = {"generator": _gen(0), "num_inference_steps": STEPS, "output_type": "pt", **kwargs}
    with pytest.raises(error, match=match):
        tiny_pipeline([0, 1], **kwargs)


def test_the_guidance_scale_is_checked_by_the_config(tiny_pipeline: SphereARPipeline) -> None:
    """``check_guidance_scale`` (configuration_sphere_ar) is the one check of a guidance scale: the config's
    recommended value, the pipeline's argument, the CLI's --guidance-scale and the demo's slider call it."""
    from sphere_ar_hf.configuration_sphere_ar import SphereARConfig, check_guidance_scale

    assert check_guidance_scale(4) == 4.0 and type(check_guidance_scale(4)) is float
    assert check_guidance_scale(np.float32(2.5)) == 2.5 and check_guidance_scale(-3.0e38) == -3.0e38
    for bad, error, message in ((math.nan, ValueError, "got nan"), (1e39, ValueError, "got 1e+39"),
                                (10**400, ValueError, "got an integer beyond the float range"),
                                ("4", TypeError, "guidance_scale must be a float, got str"),
                                (True, TypeError, "got bool"), (None, TypeError, "got NoneType")):
        with pytest.raises(error) as e:
            check_guidance_scale(bad)
        text = str(e.value)
        assert message in text and text.startswith("guidance_scale must be a") and "\n" not in text
    with pytest.raises(ValueError, match=r"^guidance_scale: must be a finite float32 number .*got 1e\+39$"):
        SphereARConfig(guidance_scale=1e39)  # the recommended scale too
    # a numpy scale samples as the same float would
    tokens = [tiny_pipeline([0, 1], guidance_scale=g, num_inference_steps=STEPS, generator=_gen(0),
                            output_type="latent").images for g in (np.float32(3.0), 3.0)]
    assert torch.equal(*tokens)


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 64, 64), (1, 3, 32, 16), (1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32), (1, 1, 3, 32, 32)],
)
def test_vae_encode_rejects_bad_images(tiny_pipeline: SphereARPipeline, shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, 32, 32\), got " + re_tuple(shape)):
        tiny_pipeline.vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 5, 16), (1, 16, 16), (1, 4, 8), (1, 4, 17), (4, 16), (1, 1, 4, 16)])
def test_vae_decode_rejects_bad_latents(tiny_pipeline: SphereARPipeline, shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, 16\).*got " + re_tuple(shape)):
        tiny_pipeline.vae.decode(torch.zeros(shape))


def re_tuple(shape: tuple) -> str:
    return r"\(" + r",\s*".join(str(s) for s in shape) + (r",\)" if len(shape) == 1 else r"\)")


# ----------------------------------------------------------------------------- normalize_tokens (the ablation)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_normalize_tokens_off_applies_no_projection(make_pipeline, guidance: float) -> None:
    pipe = make_pipeline()
    on = _run(pipe, [0, 1], guidance_scale=guidance, output_type="latent").norm(dim=-1)
    assert torch.allclose(on, torch.full_like(on, 4.0), atol=1e-5)  # radius sqrt(16), also after CFG
    pipe.transformer.config.normalize_tokens = False
    off = _run(pipe, [0, 1], guidance_scale=guidance, output_type="latent").norm(dim=-1)
    assert torch.isfinite(off).all() and (off - 4.0).abs().max() > 0.1  # the raw predictions, not projected
    # the first token sees the same trunk and noise either way: it differs from the projected one by its norm only
    first_on = _run(make_pipeline(), [0, 1], guidance_scale=guidance, output_type="latent")[:, 0]
    first_off = _run(pipe, [0, 1], guidance_scale=guidance, output_type="latent")[:, 0]
    assert torch.allclose(torch.nn.functional.normalize(first_off, dim=-1) * 4.0, first_on, atol=1e-5)


def test_normalize_tokens_round_trips_and_is_validated(make_pipeline, tmp_path) -> None:
    from sphere_ar_hf import SphereARConfig

    pipe = make_pipeline()
    pipe.transformer.config.normalize_tokens = False
    pipe.save_pretrained(tmp_path / "baseline")
    assert SphereARPipeline.from_pretrained(tmp_path / "baseline").transformer.config.normalize_tokens is False
    assert SphereARConfig().normalize_tokens is True
    with pytest.raises(ValueError, match="normalize_tokens: must be bool, got 'yes'"):
        SphereARConfig(normalize_tokens="yes")
