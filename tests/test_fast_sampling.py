"""The sampler where users run it: the head's sampling plan, the fast path (``enable_torch_compile``: images,
host operators, recompiles, benchmarks/bench_sampling.py), a token loop that never waits for the device, and CPU
offload (diffusers' model and sequential offload sample the same images, every transformer computation behind its
module's hook). benchmarks/bench_gpu.py, run on the CPU, is tested in test_gpu_benchmark.py."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload, ModelHook, add_hook_to_module

from conftest import compiled_graphs
from sphere_ar_hf import SphereARScheduler, SphereARTransformer
from sphere_ar_hf.modeling_sphere_ar import SamplingPlan

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
TOKENS = 4  # the tiny pipeline's tokens per image
TRUNK_GRAPHS = 1  # the fast path's trunk step: one for every token, per short row count or for every larger batch size
# (the cache has a spare position: no token's keys fill it, which dynamo would specialise)


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def _latents(pipe, labels, generator=None, **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "latent", **kwargs}
    generator = _gens(len(labels)) if generator is None else generator
    return pipe(labels, generator=generator, **kwargs).images


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the plan
@torch.no_grad()
def test_sampling_plan_gives_the_heads_velocity(make_transformer) -> None:
    tf = make_transformer()
    head, rows, g = tf.head, 3, torch.Generator().manual_seed(0)
    times = SphereARScheduler(num_inference_steps=6).timesteps
    z, x = torch.randn(rows, 64, generator=g), torch.randn(rows, 16, generator=g)
    one_step = rows * head.modulation_width * 4
    for max_bytes in (1, 2 * one_step, 2**30):  # a chunk of 1 step, of 2, all steps
        plan = tf.sampling_plan(times, rows, max_bytes=max_bytes)
        assert plan.chunk == max(1, max_bytes // one_step)
        plan.start_token(z)
        for k, t in enumerate(times):  # the training forward's velocity at each step, bit for bit
            assert torch.equal(plan.velocity(x, k), head(x, t.expand(rows), z))
        assert plan.nbytes >= plan.time_embeddings.nbytes + min(plan.chunk, len(times)) * one_step
    fast = tf.sampling_plan(times, rows, exact=False)
    assert fast.time_embeddings.shape == (len(times), 1, head.dim)  # once per step, shared by the rows
    mods = fast.token_modulations(z)  # per projection, (steps, rows, width)
    assert len(mods) == len(head.adaln) + 1 and all(m.shape[:2] == (len(times), rows) for m in mods)
    for k, t in enumerate(times):  # the same values, to float rounding
        for got, want in zip(mods, head.modulations(head.embed_time(t.expand(rows)), head.embed_condition(z))):
            torch.testing.assert_close(got[k], want, atol=1e-6, rtol=1e-5)
    all_steps = len(times) * one_step  # the fast path holds a token's modulations for all its steps
    assert SamplingPlan.estimate_bytes(head, len(times), rows, torch.float32, exact=False) >= all_steps
    assert SamplingPlan.estimate_bytes(head, len(times), rows, torch.float32, max_bytes=1) < all_steps


# ----------------------------------------------------------------------------- the fast path
@pytest.mark.parametrize("sampler", ["euler_maruyama", "euler", "heun"])
@pytest.mark.parametrize("per_image", [True, False])
def test_fast_path_matches_eager(make_pipeline, fresh_dynamo, sampler: str, per_image: bool) -> None:
    """Linear guidance: an unguided first token (one state per row), then guided ones; both kinds of generator."""
    pipe = make_pipeline()
    pipe.scheduler = SphereARScheduler.from_config(pipe.scheduler.config, sampler=sampler)

    def run():
        return _latents(pipe, [1, 7, 3], _gens(3, 5) if per_image else torch.Generator().manual_seed(5))

    eager = run()
    pipe.enable_torch_compile(backend="eager")
    fast = run()
    assert compiled_graphs() >= 1  # the steps ran through torch.compile
    assert (fast - eager).abs().max() <= 1e-4  # measured <= 2e-6: float rounding of other product shapes
    assert (fast - _latents(pipe, [1, 7, 3], _gens(3, 6))).abs().max() > 1e-2  # the noise matters
    pipe.disable_torch_compile()
    assert torch.equal(run(), eager)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_fast_path_samples_through_lora_adapters(make_pipeline, fresh_dynamo, backend: str) -> None:
    """PEFT adapters on the trunk and the head: the compiled steps and trunk step trace them (fullgraph) and give
    the eager sampler's images (inductor: with the adapters' low-rank products as generated code, the thin products
    pass); the adapters matter."""
    from sphere_ar_hf.lora import add_lora, build_lora_config

    pipe, plain = make_pipeline(), make_pipeline()
    add_lora(pipe.transformer, build_lora_config(rank=4, lora_head=True))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:  # (zero at init: the adapters would change nothing)
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    eager = _latents(pipe, [1, 7])
    pipe.enable_torch_compile(backend=backend)
    trunk, trunk_calls = pipe._compiled_sampler.trunk, []
    with mock.patch.object(pipe._compiled_sampler, "trunk", lambda *args: trunk_calls.append(1) or trunk(*args)):
        fast = _latents(pipe, [1, 7])
    assert len(trunk_calls) == TOKENS - 1 and compiled_graphs() >= 1
    assert (fast - eager).abs().max() <= 1e-4
    assert (fast - _latents(plain, [1, 7])).abs().max() > 1e-2


def test_cpu_fast_path_scans_runs_of_steps(make_pipeline, fresh_dynamo) -> None:
    """On the CPU a run of SDE steps is one compiled scan (two steps per iteration), the final Euler step one
    compiled step; an odd run ends with single steps. Same states as stepping one call at a time."""
    pipe = make_pipeline()
    pipe.enable_torch_compile(backend="eager")
    fast = pipe._compiled_sampler
    calls, trunk = {"runs": 0, "steps": 0}, fast.trunk

    def counted(table, name):
        for kind, fn in list(table.items()):
            def wrapper(*args, fn=fn):
                calls[name] += 1
                return fn(*args)
            table[kind] = wrapper

    counted(fast.runs, "runs")
    counted(fast.steps, "steps")
    scanned = _latents(pipe, [1, 7])
    assert calls == {"runs": TOKENS, "steps": TOKENS}, calls  # per token: one scan of 4 SDE steps, one Euler step
    calls.update(runs=0, steps=0)
    _latents(pipe, [1, 7], num_inference_steps=5)  # 5 SDE steps: a scan of 4, then one step, then Euler
    assert calls == {"runs": TOKENS, "steps": 2 * TOKENS}, calls
    calls.update(runs=0, steps=0)
    trunk_calls = []
    with mock.patch.object(fast, "trunk", lambda *args: trunk_calls.append(args[2]) or trunk(*args)):
        assert torch.equal(_latents(pipe, [1, 7]), scanned)  # the trunk steps between tokens: compiled
    assert trunk_calls == list(range(TOKENS - 1)), trunk_calls
    calls.update(runs=0, steps=0)
    run_token = fast.run_token
    with mock.patch.object(fast, "run_token", lambda *args, scan_runs: run_token(*args, scan_runs=False)):
        stepped = _latents(pipe, [1, 7])  # the same loop, one compiled call per step
    assert calls == {"runs": 0, "steps": 5 * TOKENS}, calls
    assert (stepped - scanned).abs().max() <= 1e-5  # measured: float rounding of the scan's stacked inputs


def test_cpu_fast_path_steps_one_call_each_where_inductor_cannot_scan(make_pipeline, fresh_dynamo,
                                                                      monkeypatch) -> None:
    """With a torch older than 2.10 (whose inductor cannot compile a scan: ``SCANS_COMPILE`` is False there), the
    CPU runs every step as its own compiled call, as CUDA does: no scan is traced, the images are eager's."""
    from sphere_ar_hf import fast_sampling

    pipe = make_pipeline()
    eager = _latents(pipe, [1, 7])
    monkeypatch.setattr(fast_sampling, "scan", mock.Mock(side_effect=AssertionError("a scan was traced")))
    monkeypatch.setattr(fast_sampling, "SCANS_COMPILE", False)
    pipe.enable_torch_compile(backend="eager")
    fast = _latents(pipe, [1, 7])
    assert compiled_graphs() >= 1 and (fast - eager).abs().max() <= 1e-4
    monkeypatch.setattr(fast_sampling, "SCANS_COMPILE", True)  # the control: where scans compile, one is traced
    with pytest.raises(Exception, match=r"return scan\(body"):  # dynamo reached the (patched) scan
        _latents(pipe, [1, 7])


def test_fast_path_recompiles_a_bounded_number_of_times(make_pipeline, fresh_dynamo) -> None:
    pipe = make_pipeline()
    pipe.enable_torch_compile(backend="eager")
    counts = []
    for batch in (2, 2, 3, 3, 5, 2, 1, 1, 4):
        before = compiled_graphs()
        _latents(pipe, list(range(batch)))
        counts.append(compiled_graphs() - before)
    # the first shape (4 rows): one graph per step function used (SDE / Euler step, guided or not) and the trunk
    # step's, all with the rows static (fast_sampling.static_rows: 1 .. SHORT rows); 6 rows: each once more with a
    # dynamic batch size (the trunk step's: one for every token and larger batch size); batch 1 (2 rows, static):
    # every one again; a shape seen before, or any other batch size, never compiles again
    assert counts[0] == counts[2] == counts[6] == 4 + TRUNK_GRAPHS, counts
    assert counts[1] == counts[3] == counts[4] == counts[5] == counts[7] == counts[8] == 0, counts
    pipe.enable_torch_compile(backend="eager")  # a new sampler shares the compiled functions
    before = compiled_graphs()
    _latents(pipe, [0, 1])
    assert compiled_graphs() == before


def test_inductor_fast_path_issues_few_host_operators(make_pipeline, fresh_dynamo) -> None:
    """Counted with torch.profiler over a whole call: the eager sampler issues dozens of operators per head
    evaluation; the compiled step, its blocks' matrix products (4 here: the thin input and output projections are
    generated code, :mod:`sphere_ar_hf.thin_products`) and little else."""
    bench, pipe = _bench(), make_pipeline()
    kw = dict(guidance_scale=3.0, cfg_schedule="constant", generator=_gens(1))
    steps = 50
    eager_ops = bench.host_ops_per_evaluation(pipe, [4], steps, **kw)
    eager = _latents(pipe, [4], _gens(1), num_inference_steps=steps, cfg_schedule="constant")
    pipe.enable_torch_compile()
    fast = _latents(pipe, [4], _gens(1), num_inference_steps=steps, cfg_schedule="constant")  # compiles
    graphs = compiled_graphs()
    fast_ops = bench.host_ops_per_evaluation(pipe, [4], steps, **{**kw, "generator": _gens(1)})
    assert compiled_graphs() == graphs  # no recompilation for a call of the same shape
    assert eager_ops >= 30 and fast_ops <= 12, (eager_ops, fast_ops)
    assert (fast - eager).abs().max() <= 1e-4
    # a new sampler with the same settings shares the compiled functions: inductor's options made torch.compile
    # build a new backend per call, and dynamo compiles again for a new backend
    for cuda_graph in (True, False):
        pipe.enable_torch_compile(cuda_graph=cuda_graph)
        again = _latents(pipe, [4], _gens(1), num_inference_steps=steps, cfg_schedule="constant")
        assert compiled_graphs() == graphs and torch.equal(again, fast)


def test_the_sampling_benchmark_times_both_paths(fresh_dynamo, capsys) -> None:
    """benchmarks/bench_sampling.py as its README runs it, shortened (4 steps, 64 images for the Fréchet distance,
    2 seeds): both paths time, count and agree (its timers sit outside the compiled trunk step)."""
    bench = _bench()
    bench.main(bench.parse_args(["--models", "digits", "--paths", "eager,fast", "--batch-sizes", "1", "--steps", "4",
                                 "--repeats", "1", "--count-ops", "--fd", "64", "--fd-seeds", "2"]))
    out = capsys.readouterr().out
    assert re.search(r"^fast +batch +1: .* \[trunk +\d", out, re.M), out
    fast_ops = float(re.search(r"^fast: ([\d.]+) host-issued", out, re.M).group(1))
    eager_ops = float(re.search(r"^eager: ([\d.]+) host-issued", out, re.M).group(1))
    assert fast_ops < eager_ops / 2, out
    assert float(re.search(r"largest image difference \(same seeds, \[0, 1\] scale\) ([\d.e+-]+)", out).group(1)) < 1e-4
    for path in ("eager", "fast"):  # Fréchet distances per seed, then mean ± std (SE)
        assert re.search(rf"^digits Fréchet distance, 64 images, seeds 0..1, {path}: [\d.]+, [\d.]+; [\d.]+ ± [\d.]+ "
                         r"\(SE [\d.]+\)$", out, re.M), out
    number = r"-?[\d.]+(e[+-]\d+)?"
    assert re.search(rf"^digits Fréchet distance, fast - eager \(same seed\): {number} ± {number} \(SE {number}\)", out,
                     re.M), out


def test_top_level_operator_count() -> None:
    bench = _bench()
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.nn.functional.linear(a, b)  # aten::linear calls aten::t and aten::addmm: one top-level operator
        a + b
    assert bench.top_level_ops(prof.events()) == 2


# ----------------------------------------------------------------------------- no waiting inside the loop
SYNCING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")


class TrappingBar:
    """A progress bar that, while the token loop runs (it is the loop's ``with`` block), turns every call that reads
    a tensor's value on the host (which waits for the device on a GPU) into an AssertionError."""

    def __init__(self, total: int):
        self.total, self.tokens, self.stack = total, 0, contextlib.ExitStack()

    def __enter__(self) -> TrappingBar:
        for name in SYNCING:
            self.stack.enter_context(mock.patch.object(torch.Tensor, name, trap(name), create=True))
        self.stack.enter_context(mock.patch.object(torch.cuda, "synchronize", trap("torch.cuda.synchronize")))
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):  # a copy from an accelerator to the host
            out = original_to(tensor, *args, **kwargs)
            if tensor.device.type != "cpu" and out.device.type == "cpu":
                raise AssertionError("a copy to the host inside the token loop")
            return out

        self.stack.enter_context(mock.patch.object(torch.Tensor, "to", to))
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")
            self.stack.callback(torch.cuda.set_sync_debug_mode, "default")
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def update(self, n: int = 1) -> None:
        self.tokens += n


def trap(name: str):
    def raiser(*args, **kwargs):
        raise AssertionError(f"{name} inside the token loop")

    return raiser


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("per_image", [True, False])
def test_no_host_synchronisation_inside_the_token_loop(make_pipeline, fresh_dynamo, fast: bool,
                                                       per_image: bool) -> None:
    pipe = make_pipeline()
    if fast:
        pipe.enable_torch_compile(backend="eager")
    generator = (lambda: _gens(2)) if per_image else (lambda: torch.Generator().manual_seed(0))
    expected = _latents(pipe, [2, 8], generator())  # (the fast path compiles here)
    bars = []

    def progress_bar(iterable=None, total=None):
        bars.append(TrappingBar(total))
        return bars[-1]

    pipe.progress_bar = progress_bar
    assert torch.equal(_latents(pipe, [2, 8], generator()), expected)
    assert bars[-1].tokens == TOKENS  # the traps stood for the whole loop

    def reads(p, i, t, kwargs):  # the control: a host read inside the loop is caught
        return {"token": kwargs["token"] * float(kwargs["token"].norm())}

    with pytest.raises(AssertionError, match="__float__ inside the token loop"):
        _latents(pipe, [2, 8], generator(), callback_on_step_end=reads)


# ----------------------------------------------------------------------------- offload
class MetaOffload(ModelHook):
    """Model offload made visible on the CPU: an offloaded model holds no values (its weights on the meta
    device) and its hook restores them. Whatever runs on the model before its hook has moved it in fails."""

    execution_device = torch.device("cpu")

    def __init__(self, previous: MetaOffload | None = None):
        self.previous, self.moves = previous, 0

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.module, self.weights = module, {k: v.clone() for k, v in module.state_dict().items()}
        module.to("meta")
        return module

    def pre_forward(self, module, *args, **kwargs):
        if self.previous is not None:
            self.previous.module.to("meta")
        if next(module.parameters()).is_meta:
            module.load_state_dict(self.weights, assign=True)
            self.moves += 1
        return args, kwargs


def _meta_offload(pipe) -> tuple[MetaOffload, MetaOffload]:
    first = MetaOffload()
    add_hook_to_module(pipe.transformer, first)
    second = MetaOffload(previous=first)
    add_hook_to_module(pipe.vae, second)
    return first, second


@pytest.mark.parametrize("fast", [False, True])
def test_model_offload_hooks_move_the_transformer_before_it_computes(make_pipeline, fresh_dynamo,
                                                                     fast: bool) -> None:
    images = _latents(make_pipeline(), [3, 4], output_type="pt")
    pipe = make_pipeline()
    if fast:
        pipe.enable_torch_compile(backend="eager")
    transformer, vae = _meta_offload(pipe)
    assert torch.equal(_latents(pipe, [3, 4], output_type="pt"), images)
    assert transformer.moves == 1 and vae.moves == 1 and pipe.transformer.device.type == "meta"
    # the control: an entry point without its hook computes on the offloaded (meta) weights and fails
    unhooked = SphereARTransformer.sampling_plan.__wrapped__
    with mock.patch.object(SphereARTransformer, "sampling_plan", unhooked):
        with pytest.raises(RuntimeError, match="Tensor on device meta"):
            _latents(pipe, [3, 4])


def test_diffusers_model_cpu_offload_on_the_cpu(make_pipeline) -> None:
    images = _latents(make_pipeline(), [3, 4], output_type="pt")
    pipe = make_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")  # diffusers' own hooks, with the CPU standing in for the device
    assert pipe._execution_device.type == "cpu"
    assert all(isinstance(m._hf_hook, CpuOffload) for m in (pipe.transformer, pipe.vae))
    for _ in range(2):  # maybe_free_model_hooks puts the hooks back after a call
        assert torch.equal(_latents(pipe, [3, 4], output_type="pt"), images)


@pytest.mark.parametrize("fast", [False, True])
def test_sequential_cpu_offload_reads_no_weight_around_its_module(make_pipeline, fresh_dynamo, caplog,
                                                                  fast: bool) -> None:
    """Sequential offload keeps every weight on the meta device outside its module's forward: a weight read around
    its module would compute on meta tensors and fail. The hooks are those ``enable_sequential_cpu_offload``
    installs (``accelerate.cpu_offload`` on each model), with the CPU as the execution device: diffusers names it
    ``cpu:0``, to which accelerate cannot move a weight, so they are installed here as diffusers does."""
    images = _latents(make_pipeline(), [3, 4], output_type="pt")
    pipe = make_pipeline()
    if fast:
        pipe.enable_torch_compile(backend="eager")
    for model in (pipe.transformer, pipe.vae):
        cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)
    assert pipe._execution_device.type == "cpu"
    assert pipe.transformer.head_pos_embedding.weight.device.type == "meta"
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_latents(pipe, [3, 4], output_type="pt"), images)
    assert ("sampling eagerly" in caplog.text) == fast  # nothing to compile: each call moves its module's weights
    assert pipe.transformer.head_pos_embedding.weight.device.type == "meta"
    # the control: a weight read around its module (here the position embedding's) computes on meta and fails
    tf = pipe.transformer
    with pytest.raises(RuntimeError, match="Tensor on device meta"):
        tf.norm(torch.zeros(1, 64)) + tf.head_pos_embedding.weight[0]


def test_group_offload_samples_eagerly(make_pipeline, fresh_dynamo, caplog) -> None:
    """diffusers' ``enable_group_offload`` hooks the transformer's modules (each call moves its weights in Python):
    the fast path declines, with a warning, and the images are the eager sampler's, bit for bit. The hooks are real
    (the CPU stands in for both devices)."""
    images = _latents(make_pipeline(), [3, 4], output_type="pt")
    pipe = make_pipeline()
    pipe.enable_torch_compile(backend="eager")
    cpu = torch.device("cpu")
    pipe.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    assert any(hasattr(m, "_diffusers_hook") for m in pipe.transformer.head.modules())
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_latents(pipe, [3, 4], output_type="pt"), images)
    assert "sequential or group offload moves weights per module call: sampling eagerly" in caplog.text


def _compile_whole(pipe, idiom: str) -> None:
    if idiom == "Module.compile":
        pipe.transformer.compile(backend="eager")
    elif idiom == "torch.compile":
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    else:  # the head alone
        pipe.transformer.head.compile(backend="eager")


@pytest.mark.parametrize("idiom", ["Module.compile", "torch.compile", "head"])
def test_compiling_the_transformer_whole_says_sampling_does_not_call_it(make_pipeline, fresh_dynamo, caplog,
                                                                       idiom: str) -> None:
    """diffusers' idioms ``pipe.transformer.compile()`` and ``torch.compile(pipe.transformer)`` compile ``forward``,
    which sampling never calls: a call says so and samples eagerly (before, silently: no graph was compiled). With
    ``enable_torch_compile`` on the same transformer, the fast path runs, and says nothing."""
    eager = _latents(make_pipeline(), [3, 4])
    pipe = make_pipeline()
    _compile_whole(pipe, idiom)
    graphs = compiled_graphs()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_latents(pipe, [3, 4]), eager)
    assert compiled_graphs() == graphs  # nothing it compiled ran
    assert "is compiled, but sampling does not call its forward: sampling eagerly" in caplog.text
    assert ("pipe.transformer.head" in caplog.text) == (idiom == "head")
    caplog.clear()
    pipe.enable_torch_compile(backend="eager")
    with caplog.at_level(logging.WARNING):
        assert (_latents(pipe, [3, 4]) - eager).abs().max() <= 1e-4
    assert compiled_graphs() > graphs and "sampling eagerly" not in caplog.text


def test_compiling_the_layers_is_reached_by_sampling(make_pipeline, fresh_dynamo, caplog) -> None:
    """A regional compile (each trunk layer's ``forward``) is what the eager sampler's trunk calls: it compiles and
    runs, and nothing is said."""
    eager = _latents(make_pipeline(), [3, 4])
    pipe = make_pipeline()
    for layer in pipe.transformer.layers:
        layer.compile(backend="eager")
    graphs = compiled_graphs()
    with caplog.at_level(logging.WARNING):
        assert (_latents(pipe, [3, 4]) - eager).abs().max() <= 1e-4
    assert compiled_graphs() > graphs and "sampling eagerly" not in caplog.text
