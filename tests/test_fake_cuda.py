"""The pipeline's CUDA paths on a machine without a GPU: every tensor made for (or moved to) a CUDA device is a fake
CUDA tensor (torch's ``FakeTensorMode``: shape, dtype and device, no values), so a tensor left on the CPU beside
CUDA ones fails as it would on a GPU ("Expected all tensors to be on the same device"), and any read of a device
value (``.item()``, ``bool()``, ``float()``, ``.cpu()``) raises ``DataDependentOutputException`` where it happens.

On the CPU every tensor is on one device, so the tests elsewhere cannot see a tensor on the wrong one. Here the token
loop (eager and fast, float32 and bfloat16, no / one / per-image generators: the pinned-memory noise branch only a
CUDA device takes) and model CPU offload with CUDA as the execution device (diffusers' own hooks) must run until the
one read of the device that the pipeline makes on purpose, after the loop. What fakes cannot show: CUDA graph capture,
timings, numerics (``benchmarks/bench_gpu.py`` measures those on a GPU), and sequential offload (accelerate rebuilds
each parameter by its class, which a fake tensor does not survive; its hooks are tested on the CPU in
test_fast_sampling.py).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

from conftest import build_tiny_pipeline
from sphere_ar_hf import SphereARPipeline
from sphere_ar_hf.fast_sampling import trunk_step

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = [3, 7]


def enable_fast_path(pipe: SphereARPipeline) -> None:
    """The compiled steps (dynamo's eager backend: inductor needs a real GPU), no graph capture. The trunk step runs
    uncompiled: dynamo cannot trace :class:`FakeCuda`'s factories (it skips ``FakeTensorMode.from_tensor``); the
    compiled trunk step runs the same model code, and is tested on the CPU (tests/test_fast_sampling.py)."""
    pipe.enable_torch_compile(backend="eager", cuda_graph=False)
    pipe._compiled_sampler.trunk = trunk_step


def _is_cuda(device: object) -> bool:
    return isinstance(device, str | torch.device) and torch.device(device).type == "cuda"


class FakeCuda(TorchFunctionMode):
    """Tensors created on, or moved to, a CUDA device become fake CUDA tensors; everything else runs as it is (the
    host's arithmetic, CPU generators drawing real numbers). Pinned memory is a no-op."""

    def __init__(self):
        super().__init__()
        self.fake = FakeTensorMode(allow_non_fake_inputs=True)

    def move(self, tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``tensor.to(*args, **kwargs)`` with a CUDA target: a fake CUDA tensor of its shape and dtype."""
        fake = tensor if isinstance(tensor, FakeTensor) else self.fake.from_tensor(tensor)
        with self.fake:
            return fake.to(*args, **kwargs) if args or kwargs else fake.to("cuda")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            if func is torch.Tensor.cuda or _is_cuda(target) or isinstance(args[0], FakeTensor):
                return self.move(args[0], *args[1:], **kwargs) if func is torch.Tensor.to else self.move(args[0])
        if _is_cuda(kwargs.get("device")):  # a factory (tensor, empty, zeros, full, randn, ...) on CUDA
            kwargs["device"] = "cpu"
            out = func(*args, **kwargs)
            return self.move(out) if isinstance(out, torch.Tensor) else out
        return func(*args, **kwargs)

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with every parameter and buffer on the fake CUDA device (``Module.to`` cannot swap them)."""
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(self.move(p.detach()), requires_grad=False)
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = self.move(b)
        return module


@pytest.fixture
def fake_cuda(monkeypatch) -> FakeCuda:
    """A :class:`FakeCuda` with the CUDA runtime's host-side calls answered as on one idle 80 GiB GPU."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    yield FakeCuda()
    torch._dynamo.reset()


def _pipeline(dtype: torch.dtype, on: FakeCuda | None) -> SphereARPipeline:
    """The tiny pipeline in ``dtype``, on the fake CUDA device of ``on`` (``None``: on the CPU)."""
    pipe = build_tiny_pipeline()
    for model in (pipe.transformer, pipe.vae):
        model.to(dtype)
        if on is not None:
            on.model(model)
    return pipe


def first_device_read(fake_cuda: FakeCuda, call: Callable[[], object]) -> str:
    """``call()`` under ``fake_cuda`` up to its first read of a device value: ``"function: source line"`` of the
    package's innermost frame there. Any other error (a device mismatch, a CUDA-only call) fails the test."""
    with pytest.raises(DataDependentOutputException) as caught, fake_cuda:
        call()
    frames = [f for f in traceback.extract_tb(caught.value.__traceback__) if "/sphere_ar_hf/" in f.filename]
    return f"{frames[-1].name}: {frames[-1].line}"


AFTER_THE_LOOP = "__call__: if not torch.isfinite(latents).all():  # after the loop: the one wait for the device " \
                 "before decoding"


def _generator(kind: str) -> torch.Generator | list[torch.Generator] | None:
    return {"none": None, "one": torch.Generator().manual_seed(0),
            "per_image": [torch.Generator().manual_seed(i) for i in range(len(LABELS))]}[kind]


@pytest.mark.parametrize("generator", ["none", "one", "per_image"])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_loop_on_cuda_keeps_every_tensor_there_and_reads_it_once(fake_cuda, dtype, fast, generator) -> None:
    pipe = _pipeline(dtype, fake_cuda)
    assert pipe._execution_device.type == "cuda"
    if fast:
        enable_fast_path(pipe)
    call = lambda: pipe(LABELS, generator=_generator(generator), num_inference_steps=4, output_type="latent")  # noqa: E731
    assert first_device_read(fake_cuda, call) == AFTER_THE_LOOP


def _offloaded(monkeypatch, fast: bool) -> SphereARPipeline:
    """The tiny pipeline on the CPU under diffusers' ``enable_model_cpu_offload(device="cuda")``."""
    pipe = _pipeline(torch.float32, None)
    if fast:
        enable_fast_path(pipe)
    with monkeypatch.context() as patch:  # (only here: torch's own code would then initialise the missing driver)
        patch.setattr(torch.cuda, "is_available", lambda: True)
        pipe.enable_model_cpu_offload(device="cuda")
    assert pipe._execution_device.type == "cuda" and pipe.transformer.device.type == "cpu"
    return pipe


@pytest.mark.parametrize("fast", [False, True])
def test_model_cpu_offload_to_cuda_runs_the_token_loop_there(fake_cuda, monkeypatch, fast) -> None:
    """The weights start on the CPU, the transformer's hook moves it to CUDA when the loop first uses it, and every
    tensor of the loop is made on the execution device."""
    pipe = _offloaded(monkeypatch, fast)
    call = lambda: pipe(LABELS, generator=_generator("per_image"), num_inference_steps=4, output_type="pt")  # noqa: E731
    assert first_device_read(fake_cuda, call) == AFTER_THE_LOOP
    assert pipe.transformer.device.type == "cuda" and pipe.vae.device.type == "cpu"  # each moved by its hook only


def test_model_cpu_offload_to_cuda_decodes_there(fake_cuda, monkeypatch) -> None:
    """The latents go to the execution device and the VAE's hook (on ``decode``) moves the VAE there first. (A fresh
    pipeline: offloading the fake transformer back to the CPU, as the VAE's hook would, cannot swap fake weights.)"""
    pipe = _offloaded(monkeypatch, fast=False)
    with fake_cuda:
        latents = torch.nn.functional.normalize(torch.randn(2, 4, 16, device="cuda"), dim=-1) * 4
    decode = lambda: pipe._decode(latents, "pt", pipe._execution_device)  # noqa: E731
    assert first_device_read(fake_cuda, decode) == "_decode: if not torch.isfinite(decoded).all():"
    assert pipe.vae.device.type == "cuda"


def test_fake_cuda_sees_a_tensor_left_on_the_cpu(fake_cuda) -> None:
    """The control: a CPU tensor beside the fake CUDA weights fails as on a GPU, and a read inside the loop is
    caught where it happens (so the tests above cannot pass by blindness)."""
    pipe = _pipeline(torch.float32, fake_cuda)
    with pytest.raises(RuntimeError, match="same device|two different devices"), fake_cuda:
        pipe.transformer.prefill(torch.tensor(LABELS), pipe.transformer.allocate_kv_cache(2, device="cuda"))

    def reads(pipe, i, t, kwargs):
        return {"token": kwargs["token"] * float(kwargs["token"].norm())}

    call = lambda: pipe(LABELS, num_inference_steps=4, output_type="latent", callback_on_step_end=reads,  # noqa: E731
                        callback_on_step_end_tensor_inputs=["token"])
    assert first_device_read(fake_cuda, call).startswith("_callback_token:")
