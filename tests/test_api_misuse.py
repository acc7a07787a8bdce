"""Misuses of the Python API get one-line errors that name the argument: a callback that is not callable, returns
no dict or a token of the wrong shape; a `from_pretrained` source that is no folder and no repository id; a memory
estimate for a negative batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sphere_ar_hf import SphereARPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _call(pipe, callback):
    return pipe([1, 2], num_inference_steps=2, output_type="latent", callback_on_step_end=callback,
                generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("callback", "error", "needle"), [
    ("not a function", TypeError, "callback_on_step_end must be callable"),
    (lambda p, i, t, kw: None, TypeError, "callback_on_step_end must return a dict .* got NoneType"),
    (lambda p, i, t, kw: {"token": kw["token"][:1]}, ValueError, r"a token of \(1, 16\); expected a tensor of shape"),
    (lambda p, i, t, kw: {"token": "x"}, ValueError, "a token of str; expected a tensor"),
])
def test_bad_callbacks_are_named(tiny_pipeline, callback, error, needle) -> None:
    with pytest.raises(error, match=needle) as info:
        _call(tiny_pipeline, callback)
    assert "\n" not in str(info.value)


def test_a_callback_may_return_the_kwargs_or_nothing_to_change(tiny_pipeline) -> None:
    plain = _call(tiny_pipeline, None).images
    assert torch.equal(_call(tiny_pipeline, lambda p, i, t, kw: kw).images, plain)
    assert torch.equal(_call(tiny_pipeline, lambda p, i, t, kw: {}).images, plain)
    flipped = _call(tiny_pipeline, lambda p, i, t, kw: {"token": -kw["token"]}).images
    assert not torch.equal(flipped, plain)  # the returned token is the one fed back


@pytest.mark.parametrize(("source", "error", "needle"), [
    (None, TypeError, "got NoneType"),
    (123, TypeError, "got int"),
    ("/nonexistent", ValueError, "no such folder '/nonexistent'"),
    ("./missing/pipe", ValueError, "no such folder"),
    ("a/b/c", ValueError, "not a Hub repository id"),
])
def test_from_pretrained_sources_are_checked(source, error, needle) -> None:
    with pytest.raises(error, match=needle) as info:
        SphereARPipeline.from_pretrained(source)
    assert "\n" not in str(info.value)


def test_from_pretrained_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; expected a pipeline folder"):
        SphereARPipeline.from_pretrained(tmp_path / "model.safetensors")


@pytest.mark.parametrize(("batch", "steps", "needle"), [(-1, 10, "batch_size"), (0, 10, "batch_size"),
                                                        (2, 0, "num_inference_steps"), (2.5, 10, "batch_size")])
def test_sampling_bytes_refuses_what_is_no_count(tiny_pipeline, batch, steps, needle) -> None:
    with pytest.raises(ValueError, match=f"{needle} must be an integer >= 1"):
        tiny_pipeline.sampling_bytes(batch, steps, guided=True)
    assert tiny_pipeline.sampling_bytes(2, 10, guided=True) > tiny_pipeline.sampling_bytes(1, 10, guided=True) > 0
