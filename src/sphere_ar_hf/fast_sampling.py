"""The fast token sampler of :class:`.pipeline_sphere_ar.SphereARPipeline` (``enable_torch_compile``).

One ``torch.compile``-d function per sampler step does the head's velocity, the classifier-free guidance and the
scheduler update together (:data:`STEP_FUNCTIONS`: one per step kind, guided or not). A token's loop over its steps
reads only tensors that are already on the device: the noise of all its steps (drawn before,
:meth:`.SphereARScheduler.token_noise_block`), the step scalars (:meth:`.SphereARScheduler.step_table`), the
guidance scale and the modulations of all its steps (:meth:`.SamplingPlan.token_modulations`), so nothing in it
waits for the device.

Where the host's cost per step is paid:

- on CUDA, the token's loop is captured once per (rows, steps, dtype, head settings) and replayed as one CUDA graph per
  token: the host issues nothing per step;
- on the CPU, a run of steps of one kind (the 100 SDE steps of the default sampler, the Euler steps of
  ``sampler="euler"``) is one compiled call, a ``scan`` over the steps (:data:`RUN_FUNCTIONS`): the compiled step
  without a Python call, guard check and wrapper per step (measured 108 against 200 us per step on the digits model
  at batch 1). Heun's alternating steps run one compiled call each, and so does every step with a torch older than
  2.10, whose inductor cannot compile the scan (:data:`SCANS_COMPILE`).

Between tokens, the trunk step (:meth:`.SphereARTransformer.decode_step`, feeding the token back through the KV
cache) is compiled too (:func:`trunk_step`, with a dynamic token index and batch size: one graph for every token
and every batch size of more than ``SHORT`` rows), where no offload hook moves the transformer per call.

Short row counts on the CPU: the :class:`.ThinProducts` pass writes a product of a static 1 .. ``SHORT`` rows as
generated code, which streams its weight several times faster than BLAS does. Dynamo gives a function a dynamic
batch size from its second batch size on, so the sampler marks the rows static where the pass applies
(``torch._dynamo.mark_static``, :func:`static_rows`): the head's steps and the trunk step at 1 .. ``SHORT`` rows
each get a graph of their own, whatever was compiled before (at most ``SHORT`` more graphs per function).

The same code runs on the CPU (the tests) and under the CUDA graph capture: what only a GPU runs is
:class:`CapturedToken` (capture, copy-in, replay).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch._higher_order_ops import scan

from .layers import KVCache
from .modeling_sphere_ar import DiffusionHead, SamplingPlan, SphereARTransformer
from .scheduling_sphere_ar import StepTable, apply_guidance, update_step
from .thin_products import ThinProducts, short_rows

__all__ = ["FastTokenSampler", "CapturedToken", "STEP_FUNCTIONS", "RUN_FUNCTIONS", "compiled_forward",
           "guided_velocity", "module_settings", "unguided_velocity"]

MAX_GRAPHS = 4  # captured token loops kept per sampler (each holds its own memory pool)
CAPTURE_LOCK = threading.Lock()  # one CUDA graph capture in the process at a time, whichever sampler captures
UNROLL = 2  # steps per iteration of a scan (each iteration's loop test reads a value: 2 host operators)
# inductor compiles a ``scan`` (as a while loop) from torch 2.10 on (2.6-2.7: "scan is not an OpOverload", 2.8-2.9:
# its loop test is unsupported); with an older torch the CPU runs a token's steps one compiled call each, as CUDA does
SCANS_COMPILE = torch.__version__ >= "2.10"  # a TorchVersion: compared as a version (2.9.1 < 2.10), not as text


def static_rows(x: torch.Tensor) -> bool:
    """Whether a compiled step on ``x``'s rows gets a graph with a static row count (its first dimension marked
    static, ``torch._dynamo.mark_static``): where the :class:`.ThinProducts` pass rewrites products of that many rows
    (:func:`.short_rows`; it needs a static row count; SphereAR-B's trunk step at 1, 2, 3, 4 rows: 27, 30, 41, 48
    ms; with BLAS 65, 100, 136 (eager) and 74-82)."""
    return short_rows(x.device, x.shape[0])


def guided_velocity(head: DiffusionHead, x: torch.Tensor, modulations: tuple[torch.Tensor, ...],
                    guidance: torch.Tensor) -> torch.Tensor:
    """The guided velocity in float32: the head on ``[x; x]`` (rows ``[conditional; unconditional]``) combined by
    :func:`.apply_guidance` with ``guidance`` (a 0-d tensor)."""
    return apply_guidance(head.velocity(torch.cat([x, x]), list(modulations)).float(), guidance)


def unguided_velocity(head: DiffusionHead, x: torch.Tensor, modulations: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The velocity of every row on its own (a token sampled without guidance), in float32."""
    return head.velocity(x, list(modulations)).float()


# One function (one code object: its own compile cache and shape history) per step kind and guidance: dynamo
# compiles each once for the first shape and once more with a dynamic batch size, whatever else runs.
def sde_guided(head, x, modulations, scalars, noise, guidance):
    return update_step("sde", x, guided_velocity(head, x, modulations, guidance), noise, scalars, None)[0]


def sde_unguided(head, x, modulations, scalars, noise):
    return update_step("sde", x, unguided_velocity(head, x, modulations), noise, scalars, None)[0]


def euler_guided(head, x, modulations, scalars, guidance):
    return update_step("euler", x, guided_velocity(head, x, modulations, guidance), None, scalars, None)[0]


def euler_unguided(head, x, modulations, scalars):
    return update_step("euler", x, unguided_velocity(head, x, modulations), None, scalars, None)[0]


def predict_guided(head, x, modulations, scalars, guidance):
    x_next, (x0, v0) = update_step("predict", x, guided_velocity(head, x, modulations, guidance), None, scalars, None)
    return x_next, x0, v0


def predict_unguided(head, x, modulations, scalars):
    x_next, (x0, v0) = update_step("predict", x, unguided_velocity(head, x, modulations), None, scalars, None)
    return x_next, x0, v0


def correct_guided(head, x, modulations, scalars, x0, v0, guidance):
    return update_step("correct", x, guided_velocity(head, x, modulations, guidance), None, scalars, (x0, v0))[0]


def correct_unguided(head, x, modulations, scalars, x0, v0):
    return update_step("correct", x, unguided_velocity(head, x, modulations), None, scalars, (x0, v0))[0]


STEP_FUNCTIONS: dict[tuple[str, bool], Callable] = {
    ("sde", True): sde_guided, ("sde", False): sde_unguided, ("euler", True): euler_guided,
    ("euler", False): euler_unguided, ("predict", True): predict_guided, ("predict", False): predict_unguided,
    ("correct", True): correct_guided, ("correct", False): correct_unguided}


def scan_steps(step: Callable, head: DiffusionHead, x: torch.Tensor, modulations: tuple[torch.Tensor, ...],
               scalars: torch.Tensor, noise: torch.Tensor | None, guidance: torch.Tensor | None) -> torch.Tensor:
    """``step`` (an SDE or Euler step of :data:`STEP_FUNCTIONS`) over steps ``0 .. n-1`` in one ``scan``, ``UNROLL``
    steps per iteration (``n`` a multiple of it): step ``k`` reads row ``k`` of each of ``modulations`` (per
    projection, ``(n, rows, width)``), of ``scalars`` and of ``noise`` (``None``: an Euler step)."""
    extra = () if guidance is None else (guidance,)
    count = len(modulations)

    def body(state: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        for j in range(UNROLL):
            mods, rest = tuple(m[j] for m in inputs[:count]), tuple(r[j] for r in inputs[count:])
            state = step(head, state, mods, *rest, *extra)
        return state, state.new_zeros(())  # scan's per-iteration output: unused

    inputs = (*modulations, scalars) if noise is None else (*modulations, scalars, noise)
    return scan(body, x, tuple(t.unflatten(0, (-1, UNROLL)) for t in inputs))[0]


# one code object each, as the step functions above
def sde_run_guided(head, x, modulations, scalars, noise, guidance):
    return scan_steps(sde_guided, head, x, modulations, scalars, noise, guidance)


def sde_run_unguided(head, x, modulations, scalars, noise):
    return scan_steps(sde_unguided, head, x, modulations, scalars, noise, None)


def euler_run_guided(head, x, modulations, scalars, guidance):
    return scan_steps(euler_guided, head, x, modulations, scalars, None, guidance)


def euler_run_unguided(head, x, modulations, scalars):
    return scan_steps(euler_unguided, head, x, modulations, scalars, None, None)


RUN_FUNCTIONS: dict[tuple[str, bool], Callable] = {
    ("sde", True): sde_run_guided, ("sde", False): sde_run_unguided, ("euler", True): euler_run_guided,
    ("euler", False): euler_run_unguided}


def trunk_step(transformer: SphereARTransformer, token: torch.Tensor, index: int, cache: KVCache) -> torch.Tensor:
    """One trunk step, :meth:`.SphereARTransformer.decode_step`: the function the fast path compiles with dynamic
    shapes (one graph for every token index and batch size; on the CPU one more per row count of at most ``SHORT``:
    :func:`static_rows`)."""
    return transformer.decode_step(token, index, cache)


def step_runs(kinds: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """``kinds`` as runs of one kind: ``(kind, first step, step after the last)``."""
    runs: list[tuple[str, int, int]] = []
    for k, kind in enumerate(kinds):
        if runs and runs[-1][0] == kind:
            runs[-1] = (kind, runs[-1][1], k + 1)
        else:
            runs.append((kind, k, k + 1))
    return runs


COMPILED: dict[tuple, tuple[dict, dict, dict, Callable]] = {}  # compiled_functions' shared sets, by their settings
COMPILED_LOCK = threading.Lock()


def compiled_functions(compile_kwargs: dict) -> tuple[dict, dict, dict, Callable]:
    """The settings used (with inductor and no ``mode``, its ``options`` gain the :class:`.ThinProducts` pass), and
    the step functions, the run functions and the trunk step ``torch.compile``-d with them: one set per distinct
    settings in the process, shared by every sampler made with them. ``torch.compile`` makes a new backend object per
    call where it takes ``options`` (always, with the default inductor), and dynamo compiles a function again for a
    new backend object (its backend-match guard): without the sharing, a second ``enable_torch_compile()`` would
    compile every graph again. Settings that cannot be hashed (an option holding a list) get a set of their own."""
    try:
        key = tuple(sorted((name, tuple(sorted(value.items())) if isinstance(value, dict) else value)
                           for name, value in compile_kwargs.items()))
        hash(key)
    except TypeError:
        key = None
    with COMPILED_LOCK:
        if key in COMPILED:
            return COMPILED[key]
        kwargs = dict(compile_kwargs)
        if kwargs.get("backend", "inductor") == "inductor" and kwargs.get("mode") is None:
            # inductor's options (torch.compile takes them or a mode, not both)
            kwargs["options"] = {"post_grad_custom_pre_pass": ThinProducts(), **kwargs.get("options", {})}
        built = (kwargs, {kind: torch.compile(fn, **kwargs) for kind, fn in STEP_FUNCTIONS.items()},
                 {kind: torch.compile(fn, **kwargs) for kind, fn in RUN_FUNCTIONS.items()},
                 torch.compile(trunk_step, **{"dynamic": True, **kwargs}))
        if key is not None:
            COMPILED[key] = built
        return built


PLAIN_TYPES = (bool, int, float, str, type(None))
TORCH_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules"})  # their tensors: keyed by address instead


def frozen(value: object) -> object:
    """``value`` as a key: plain values as they are, lists / tuples / sets / dicts of them as tuples, any other object
    by its type."""
    if isinstance(value, PLAIN_TYPES):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(frozen(x) for x in value)
    if isinstance(value, dict):
        return tuple((k, frozen(x)) for k, x in value.items())
    return type(value)


def module_settings(module: nn.Module) -> tuple:
    """What a captured graph of ``module`` was recorded with besides its tensors' contents: the address of every
    parameter and buffer, and every submodule's plain attributes (flags, scales, names; what dynamo guards on).
    PEFT's ``disable_adapter()``, ``set_adapter``, ``scale_layer``, ``merge_adapter``, ``train()`` / ``eval()``
    and added hooks all change it, in-place weight loads do not (a replay reads them where they are)."""
    tensors = tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
    return tensors, tuple((name, frozen(value)) for m in module.modules() for name, value in vars(m).items()
                          if name not in TORCH_CONTAINERS)


def compiled_forward(transformer: nn.Module) -> str | None:
    """Which of ``pipe.transformer`` and its head a user compiled whole (``torch.compile(module)`` or
    ``module.compile()``), or ``None``: either compiles the module's ``forward``, which sampling never calls (it calls
    ``prefill``, ``decode_step`` and the head's :class:`.SamplingPlan`; a compile of the trunk's layers or the head's
    blocks is reached, as their ``forward`` runs)."""
    head = getattr(transformer, "_orig_mod", transformer).head
    for name, module in (("pipe.transformer", transformer), ("pipe.transformer.head", head)):
        if hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None:
            return name
    return None


class CapturedToken:
    """A token's step loop captured as one CUDA graph, with static input buffers: a call copies its inputs in
    (without waiting), replays the graph and returns a copy of its output. The time embeddings and step scalars are
    copied in per call, the head condition, noise and guidance per token; the weights are read where they were at
    capture (the owner keys graphs by them and the modules' settings: :func:`module_settings`).

    Captures run one at a time in the process (:data:`CAPTURE_LOCK`, across samplers and pipelines) and in
    ``thread_local`` mode: CUDA work of other threads during a capture (another request's eager sampling or decoding,
    a ``DataLoader`` pinning memory) neither fails nor invalidates it, as it would in the default ``global`` mode.
    The capture runs with the inputs' device current (``torch.cuda.device``): a pipeline on ``cuda:1`` in a process
    whose current device is ``cuda:0`` would otherwise capture on ``cuda:0``'s stream, which its kernels never reach:
    an empty graph, whose replays return the first token's state for every token. (A replay takes its capture's device
    itself: torch's ``CUDAGraph::replay`` guards it.)"""

    def __init__(self, run: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor | None, ...]):
        self.inputs = tuple(None if x is None else x.clone() for x in inputs)
        self.sources = list(inputs)  # what each buffer holds now (held, so that an identity test is sound)
        self.lock = threading.Lock()
        with torch.cuda.device(next(x.device for x in inputs if x is not None)):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run(*self.inputs)  # compiles and autotunes outside the capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with CAPTURE_LOCK, torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.output = run(*self.inputs)

    def __call__(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        with self.lock:  # static buffers: one replay at a time, its output copied before the next
            for slot, (static, x) in enumerate(zip(self.inputs, inputs)):
                if static is not None and x is not self.sources[slot]:  # per-call inputs: once per call
                    static.copy_(x, non_blocking=True)
                    self.sources[slot] = x
            self.graph.replay()
            return self.output.clone()


class FastTokenSampler:
    """The fast path's token loop (a pipeline holds one, set by ``enable_torch_compile``; it keeps compiled
    functions and captured graphs, no per-call state).

    ``sampler(plan, table, z, noise, guidance)`` returns a token's final state: ``plan`` and ``table`` are the call's
    :class:`.SamplingPlan` and :class:`.StepTable`, ``z`` the head conditions of all rows, ``noise`` the token's
    :meth:`.SphereARScheduler.token_noise_block`, ``guidance`` a 0-d tensor (guided) or ``None``.
    """

    def __init__(self, cuda_graph: bool = True, **compile_kwargs):
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph={cuda_graph!r}: expected True or False")
        if not isinstance(compile_kwargs.get("options", {}), dict):
            raise TypeError(f"options={compile_kwargs['options']!r}: expected a dict of inductor settings "
                            "(torch.compile's options)")
        if cuda_graph and compile_kwargs.get("mode") in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode={compile_kwargs['mode']!r} makes torch.compile capture CUDA graphs itself: pass "
                             "cuda_graph=False with it, or leave mode unset (the token loop is captured whole)")
        compile_kwargs.setdefault("fullgraph", True)
        self.compile_kwargs, self.steps, self.runs, self.trunk = compiled_functions(compile_kwargs)
        self.cuda_graph = cuda_graph
        self.graphs: OrderedDict[tuple, CapturedToken] = OrderedDict()
        self.lock = threading.Lock()
        self.settings: tuple[weakref.ref, tuple] | None = None  # the last call's plan and its head's settings

    @staticmethod
    def supports(transformer: nn.Module) -> bool:
        """False where hooks sit inside the transformer that change what a module call does: accelerate's
        sequential offload in the head, diffusers' hooks anywhere (``enable_group_offload``, caches): each call moves
        weights or decides in Python, which a compiled function or a captured graph would not redo. The pipeline then
        samples eagerly. (Model offload's one hook on the whole transformer is run around the eager trunk step.)"""
        return not any(hasattr(m, "_hf_hook") for m in transformer.head.modules()) and not any(
            hasattr(m, "_diffusers_hook") for m in transformer.modules())

    def decode_step(self, transformer: SphereARTransformer, token: torch.Tensor, index: int,
                    cache: KVCache) -> torch.Tensor:
        """:meth:`.SphereARTransformer.decode_step`, compiled (eager where an offload hook moves the transformer per
        call: its hook is not traced)."""
        if hasattr(transformer, "_hf_hook"):
            return transformer.decode_step(token, index, cache)
        if static_rows(token):
            torch._dynamo.mark_static(token, 0)
        with torch._dynamo.config.patch(specialize_float=True):  # float attributes (norm eps) stay constants
            return self.trunk(transformer, token, index, cache)

    def run_token(self, kinds: tuple[str, ...], noise_rows: tuple[int | None, ...], head: DiffusionHead,
                  time_embeddings: torch.Tensor, scalars: torch.Tensor, z: torch.Tensor, noise: torch.Tensor,
                  guidance: torch.Tensor | None, scan_runs: bool = False) -> torch.Tensor:
        """One token's steps (the function a CUDA graph captures): modulations of all steps, then the compiled step
        of each kind, or with ``scan_runs`` one compiled scan per run of SDE or Euler steps; no read of a device
        value."""
        modulations = SamplingPlan(head, time_embeddings, z.shape[0]).token_modulations(z)
        guided, extra = guidance is not None, (() if guidance is None else (guidance,))
        static = static_rows(z)  # the head's rows (x's, guided: half of them): decided once per token
        x, carry = noise[0].clone(), ()  # not a view, as every later x (views are guarded by their base)
        for kind, first, stop in step_runs(kinds):
            scanned = (stop - first) // UNROLL * UNROLL if scan_runs and (kind, guided) in self.runs else 0
            if scanned:  # the rest of the run (at most UNROLL - 1 steps) one step at a time
                end = first + scanned
                mods = tuple(m[first:end] for m in modulations)
                draws = (noise[noise_rows[first]:noise_rows[end - 1] + 1],) if kind == "sde" else ()
                if static:
                    torch._dynamo.mark_static(x, 0)
                x = self.runs[kind, guided](head, x, mods, scalars[first:end], *draws, *extra)
                first = end
            step = self.steps[kind, guided]
            for k in range(first, stop):
                mods = tuple(m[k] for m in modulations)
                if static:  # each step's x is a new tensor
                    torch._dynamo.mark_static(x, 0)
                if kind == "sde":
                    x = step(head, x, mods, scalars[k], noise[noise_rows[k]], *extra)
                elif kind == "predict":
                    x, *carry = step(head, x, mods, scalars[k], *extra)
                elif kind == "correct":
                    x = step(head, x, mods, scalars[k], *carry, *extra)
                else:
                    x = step(head, x, mods, scalars[k], *extra)
        return x

    def __call__(self, plan: SamplingPlan, table: StepTable, z: torch.Tensor, noise: torch.Tensor,
                 guidance: torch.Tensor | None) -> torch.Tensor:
        head = plan.head
        inputs = (plan.time_embeddings, table.scalars, z, noise, guidance)
        if self.captures(z.device):
            return self.captured(table, plan, inputs)(*inputs)
        # scans on the CPU (on CUDA their loop test reads the device)
        scan_runs = z.device.type == "cpu" and SCANS_COMPILE
        return self.run_token(table.kinds, table.noise_rows, head, *inputs, scan_runs=scan_runs)

    def captures(self, device: torch.device) -> bool:
        """Whether a token's loop on ``device`` runs as a captured CUDA graph."""
        return self.cuda_graph and device.type == "cuda"

    def token_loop(self, table: StepTable, head: DiffusionHead) -> Callable[..., torch.Tensor]:
        """The function a graph captures: ``(time_embeddings, scalars, z, noise, guidance)`` -> the token's final
        state, one compiled call per step (no scans)."""
        return lambda *inputs: self.run_token(table.kinds, table.noise_rows, head, *inputs)

    def head_settings(self, plan: SamplingPlan) -> tuple:
        """:func:`module_settings` of ``plan``'s head, read once per call (a plan belongs to one call): a change to
        the head's weights' addresses or settings between calls captures anew."""
        with self.lock:
            if self.settings is not None and self.settings[0]() is plan:
                return self.settings[1]
        settings = module_settings(plan.head)
        with self.lock:
            self.settings = (weakref.ref(plan), settings)
        return settings

    def captured(self, table: StepTable, plan: SamplingPlan, inputs: tuple) -> CapturedToken:
        """The captured loop for these shapes, step kinds and head settings (captured on first use)."""
        shapes = tuple(None if x is None else (tuple(x.shape), x.dtype) for x in inputs)
        key = (table.kinds, table.noise_rows, shapes, inputs[2].device, self.head_settings(plan))
        with self.lock:
            graph = self.graphs.pop(key, None)
            if graph is None:
                while len(self.graphs) >= MAX_GRAPHS:
                    self.graphs.popitem(last=False)
                graph = CapturedToken(self.token_loop(table, plan.head), inputs)
            self.graphs[key] = graph
        return graph
