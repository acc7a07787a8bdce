"""The CUDA-graph token loop (:class:`.CapturedToken`, ``FastTokenSampler.captured``) on the CPU, with CUDA graphs
emulated as they behave: capture records the operators run on fixed tensors, and a replay runs the same operators on
the same tensors again. Whatever a graph reads is what sat at the captured tensors at replay time: an input not copied
into its static buffer, an output not copied out before the next replay, or a weight swapped for a new tensor is
stale here as on a GPU. (What the emulation cannot show, memory pools, streams and timings, bench_gpu.py measures.)
Beside them, the uncaptured compiled path under the same adapter changes.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sphere_ar_hf import fast_sampling
from sphere_ar_hf.fast_sampling import FastTokenSampler
from sphere_ar_hf.lora import add_lora, build_lora_config

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = [1, 7, 3]
CURRENT = threading.local()  # the emulated current device (``device``; unset: the process's default), per thread


class EmulatedGraph:
    """A stand-in for ``torch.cuda.CUDAGraph``: the operators captured into it, replayed on the same tensors; the
    current device (as ``torch.cuda.device`` set it) at each capture (a replay guards its capture's device itself,
    as torch's ``CUDAGraph::replay`` does)."""

    captures = 0
    devices: list[torch.device | None] = []

    def __init__(self):
        self.ops: list[tuple] = []

    def replay(self) -> None:
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            for old, new in zip(tree_leaves(out), tree_leaves(result)):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)  # a fresh output lands where the captured one was


class Recorder(TorchDispatchMode):
    """Records every operator into ``graph`` (and runs it: a capture's outputs are the captured tensors)."""

    def __init__(self, graph: EmulatedGraph):
        super().__init__()
        self.graph = graph

    @classmethod
    def is_infra_mode(cls) -> bool:  # torch.compile'd code runs under it (as under a real capture)
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.graph.ops.append((func, args, kwargs, out))
        return out


@contextlib.contextmanager
def capture(graph: EmulatedGraph, **_):
    EmulatedGraph.captures += 1
    EmulatedGraph.devices.append(getattr(CURRENT, "device", None))
    with Recorder(graph):
        yield


class Stream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def current_device(device: torch.device):
    """``torch.cuda.device``, emulated."""
    before, CURRENT.device = getattr(CURRENT, "device", None), torch.device(device)
    try:
        yield
    finally:
        CURRENT.device = before


@pytest.fixture
def emulated_cuda_graphs():
    """``torch.cuda``'s graph and stream calls emulated, and the fast sampler's CUDA branch taken on the CPU."""
    torch._dynamo.reset()
    EmulatedGraph.captures, EmulatedGraph.devices = 0, []
    with mock.patch.multiple(torch.cuda, CUDAGraph=EmulatedGraph, graph=capture, Stream=Stream,
                             stream=lambda s: contextlib.nullcontext(), current_stream=Stream,
                             device=current_device), \
            mock.patch.object(FastTokenSampler, "captures", lambda self, device: True):
        yield
    torch._dynamo.reset()


def _latents(pipe, generator=None, **kwargs) -> torch.Tensor:
    generator = [torch.Generator().manual_seed(i) for i in range(len(LABELS))] if generator is None else generator
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "latent", **kwargs}
    return pipe(LABELS, generator=generator, **kwargs).images


def _uncaptured(pipe, **kwargs) -> torch.Tensor:
    """The same fast path with each token's loop run as the function a graph would capture (no capture)."""
    with mock.patch.object(FastTokenSampler, "captured", lambda self, table, plan, inputs:
                           self.token_loop(table, plan.head)):
        return _latents(pipe, **kwargs)


@pytest.mark.parametrize("sampler", ["euler_maruyama", "heun"])
def test_replayed_token_loops_give_the_uncaptured_images(make_pipeline, emulated_cuda_graphs, sampler) -> None:
    """One capture per shape (the unguided first token and the guided ones), replayed for every later token and
    call with that token's condition, noise and guidance: the images of the uncaptured fast path, bit for bit, and
    the eager sampler's to float rounding."""
    pipe = make_pipeline()
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, sampler=sampler)
    eager = _latents(pipe)
    pipe.enable_torch_compile(backend="eager")
    first = _latents(pipe)
    assert EmulatedGraph.captures == 2  # the unguided first token (3 rows) and the guided tokens (6 rows)
    again, other = _latents(pipe), _latents(pipe, [torch.Generator().manual_seed(9 + i) for i in range(3)])
    assert EmulatedGraph.captures == 2  # later calls of these shapes replay
    assert torch.equal(first, again) and torch.equal(first, _uncaptured(pipe))
    assert (first - eager).abs().max() <= 1e-4
    assert (other - first).abs().max() > 1e-2  # the new noise was copied in, not the captured one replayed
    stronger = _latents(pipe, guidance_scale=6.0)
    assert EmulatedGraph.captures == 2 and torch.equal(stronger, _uncaptured(pipe, guidance_scale=6.0))
    # captured with the inputs' device current (not the process's: a pipeline on cuda:1 would capture an empty
    # graph on cuda:0's stream)
    assert EmulatedGraph.devices == [torch.device("cpu")] * 2


def test_new_step_counts_capture_again_and_old_graphs_are_dropped(make_pipeline, emulated_cuda_graphs) -> None:
    pipe = make_pipeline()
    pipe.enable_torch_compile(backend="eager")
    for steps in (4, 5, 6, 4):
        assert torch.equal(_latents(pipe, num_inference_steps=steps),
                           _uncaptured(pipe, num_inference_steps=steps))
    # 2 shapes per step count; the 4-step graphs were dropped (at most MAX_GRAPHS kept) and captured again
    assert EmulatedGraph.captures == 8 and len(pipe._compiled_sampler.graphs) == fast_sampling.MAX_GRAPHS


def test_loaded_weights_are_read_by_the_replay(make_pipeline, emulated_cuda_graphs) -> None:
    """Weights loaded in place are read where the graph reads them; new weight tensors make a new graph."""
    pipe, donor = make_pipeline(), make_pipeline(seed=1)
    pipe.enable_torch_compile(backend="eager")
    _latents(pipe)
    pipe.transformer.load_state_dict(donor.transformer.state_dict())  # in place: the same addresses
    assert EmulatedGraph.captures == 2 and torch.equal(_latents(pipe), _uncaptured(pipe))
    assert EmulatedGraph.captures == 2
    pipe.transformer.load_state_dict(make_pipeline(seed=2).transformer.state_dict(), assign=True)  # new tensors
    assert torch.equal(_latents(pipe), _uncaptured(pipe)) and EmulatedGraph.captures == 4


def _head_adapter(pipe):
    """A LoRA adapter on ``pipe``'s trunk and head, its B matrices random (so that it changes the images); returns
    PEFT's view of the transformer."""
    peft_model = add_lora(pipe.transformer, build_lora_config(rank=4, lora_head=True))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, weight in pipe.transformer.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    return peft_model


def test_adapter_settings_changed_between_calls_capture_anew(make_pipeline, emulated_cuda_graphs) -> None:
    """A head adapter disabled, scaled or merged between calls changes no weight's address, only the head's
    settings: each such call captures anew (a replay of the old graph would apply the old adapter), and gives the
    uncaptured fast path's images, which follow the adapter (the control); unchanged settings replay."""
    pipe = make_pipeline()
    peft_model = _head_adapter(pipe)
    pipe.enable_torch_compile(backend="eager")
    adapted = _latents(pipe)
    assert torch.equal(_latents(pipe), adapted) and EmulatedGraph.captures == 2
    with peft_model.disable_adapter():
        off = _latents(pipe)
        assert torch.equal(off, _uncaptured(pipe)) and EmulatedGraph.captures == 4
    assert (off - adapted).abs().max() > 1e-2
    layers = [m for m in pipe.transformer.head.modules() if hasattr(m, "scale_layer")]
    for layer in layers:
        layer.scale_layer(0.25)
    scaled = _latents(pipe)
    assert torch.equal(scaled, _uncaptured(pipe)) and (scaled - adapted).abs().max() > 1e-2
    for layer in layers:
        layer.unscale_layer()
    peft_model.merge_adapter()  # the deltas added to the weights in place, the adapter branch skipped
    merged = _latents(pipe)
    assert torch.equal(merged, _uncaptured(pipe)) and (merged - adapted).abs().max() <= 1e-4
    peft_model.unmerge_adapter()
    assert (_latents(pipe) - adapted).abs().max() <= 1e-4


def test_the_compiled_steps_follow_adapter_settings(make_pipeline) -> None:
    """Without capture (the CPU's scans and compiled steps), dynamo's guards on the same settings recompile: the fast
    path's images follow the adapter disabled, scaled and merged as the eager sampler's do."""
    torch._dynamo.reset()
    pipe = make_pipeline()
    peft_model = _head_adapter(pipe)
    layers = [m for m in pipe.transformer.head.modules() if hasattr(m, "scale_layer")]

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        pipe.disable_torch_compile()
        eager = _latents(pipe)
        pipe.enable_torch_compile(backend="eager")
        return _latents(pipe), eager

    results = [both()]
    with peft_model.disable_adapter():
        results.append(both())
    for layer in layers:
        layer.scale_layer(0.25)
    results.append(both())
    for layer in layers:
        layer.unscale_layer()
    peft_model.merge_adapter()
    results.append(both())
    torch._dynamo.reset()
    for fast, eager in results:
        assert (fast - eager).abs().max() <= 1e-4
    assert min((a[1] - b[1]).abs().max() for a, b in zip(results, results[1:3])) > 1e-2  # the settings matter


class CaptureLog:
    """The emulated captures' modes and how many ran at once; the first capture waits (up to 5 s) for a second to
    start beside it, so that two captures that may overlap do."""

    def __init__(self):
        self.modes: list[str] = []
        self.active = self.most = 0
        self.lock, self.second = threading.Lock(), threading.Event()

    @contextlib.contextmanager
    def capture(self, graph: EmulatedGraph, capture_error_mode: str = "global", **_):
        with self.lock:
            self.modes.append(capture_error_mode)
            self.active += 1
            self.most, first = max(self.most, self.active), len(self.modes) == 1
        if first:
            self.second.wait(timeout=5)
        self.second.set()
        try:
            with capture(graph):
                yield
        finally:
            with self.lock:
                self.active -= 1


def test_captures_run_one_at_a_time_in_thread_local_mode(make_pipeline, emulated_cuda_graphs) -> None:
    """Two pipelines sampling in two threads (a demo's concurrent requests, a server with two models): their
    captures run one after the other, as CUDA allows one capture in a process at a time, and each in
    ``thread_local`` mode, so that the other thread's CUDA work does not invalidate it; both give their own uncaptured
    images."""
    pipes = [make_pipeline(), make_pipeline(seed=1)]
    for pipe in pipes:
        pipe.enable_torch_compile(backend="eager")
    log = CaptureLog()
    with mock.patch.object(torch.cuda, "graph", log.capture), ThreadPoolExecutor(2) as pool:
        images = [f.result() for f in [pool.submit(_latents, pipe) for pipe in pipes]]
    assert log.modes == ["thread_local"] * 4 and log.most == 1  # 2 shapes per pipeline
    for pipe, got in zip(pipes, images):
        assert torch.equal(got, _uncaptured(pipe))
    assert (images[0] - images[1]).abs().max() > 1e-2


def test_the_emulation_sees_a_stale_input(make_pipeline, emulated_cuda_graphs) -> None:
    """The control: a replay that skips copying the token's inputs in replays the first token's, and its images
    differ (so the tests above cannot pass by blindness)."""
    pipe = make_pipeline()
    pipe.enable_torch_compile(backend="eager")
    want = _uncaptured(pipe)
    def replay_only(self, *inputs):
        self.graph.replay()
        return self.output.clone()

    with mock.patch.object(fast_sampling.CapturedToken, "__call__", replay_only):
        stale = _latents(pipe)
    assert (stale - want).abs().max() > 1e-2
