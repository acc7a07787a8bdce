"""SphereARPipeline on a GPU (parts 1-3 estimated at < 8 minutes on one H200): what the CPU cannot show.

    python benchmarks/bench_gpu.py                                      # CUDA: everything below
    python benchmarks/bench_gpu.py --sections training                  # CUDA: part 4 only
    python benchmarks/bench_gpu.py --device cpu --tiny --compile-backend eager   # every code path, tiny, on the CPU

``--sections`` picks the parts (default all: ``fixture,sampling,offload,training``). On CUDA it first prints a
rough time estimate per part. Then, in order:

1. **CUDA vs CPU on the official-format fixture** (``--fixture``: ``../shared/fixtures/official-tiny``, converted
   with ``convert_official_checkpoint``): the eager sampler's tokens on the device (float32, the fixture's seeds,
   a CPU generator) against the CPU's, and its images against the official CPU images stored in the fixture; the
   same for the fast path.
2. **SphereAR-B at 256 px** (random weights, ``--dtype`` bfloat16): images/s and ms per token at ``--batch-sizes``
   (64 and 256) for the graph-captured token loop (``enable_torch_compile()``), the compiled step
   (``enable_torch_compile(cuda_graph=False)``) and the eager sampler, in that order (``--paths``: the fast paths
   first, so that a run cut short by its time limit still has their numbers); the first call's time (compile and
   capture), the graphs the timed call compiled (0: no recompilation), the peak GPU memory; the host operators per
   head evaluation (torch.profiler, as benchmarks/bench_sampling.py counts them); whether a synchronising CUDA call
   ran inside the token loop (``torch.cuda.set_sync_debug_mode``); the bfloat16 images' distance from float32 ones
   (same weights and seeds, eager float32); the trunk steps alone at the largest batch, eager and compiled (their
   ms per token, and how long the host took to issue them: whether the trunk step is bound by the host, which
   capturing it too would remove); the VAE decoder at the largest batch in one pass and with
   ``vae.enable_slicing()`` (time, peak memory, the estimate); and the time 50,000 images would take at the best
   rate.
3. **Offload, end to end**: ``enable_model_cpu_offload()``, ``enable_sequential_cpu_offload()`` and
   ``enable_group_offload()`` (leaf level) on the fixture's pipeline (eager, and model offload with the fast path)
   against the same path's images without offload; first, two requests at once (``gpu_threads.py``): a graph
   capture beside an eager call in another thread.
4. **A training step of SphereAR-B at 256 px from cached latents**: the trainer's step (the model's loss as
   ``SphereARTrainer.compute_loss`` calls it, ``--train-dtype`` autocast, backward, clipping, fused AdamW, EMA),
   eager and ``torch.compile``d at each ``--train-batch`` (64 and 128): median step time, images/s, first step,
   peak memory, losses; out of memory is a result line. What each number is: benchmarks/README.md.

On the CPU (``--device cpu``, with ``--tiny``: a tiny random model at 32 px) the same code runs, the offload paths
with the CPU standing in for the accelerator (``device="cpu"``), training without fused AdamW at batches 8 and 16
with 1 + 5 steps (about 45 s in all, 1 thread); tests/test_gpu_benchmark.py runs it so.

Running it on the GPU machine (torch, transformers, accelerate, peft and safetensors installed; no diffusers, no
network): see benchmarks/README.md. In short, here: ``pip wheel diffusers==$(python -c "import diffusers;
print(diffusers.__version__)") --no-deps -w .whl/`` and copy the fixture into the ignored ``.gl/`` folder; carry
``.whl`` and ``.gl``; there: ``pip install --no-deps .whl/*.whl && PYTHONPATH=src python benchmarks/bench_gpu.py
--fixture .gl/official-tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "src", ROOT / "benchmarks"):  # the package; the other parts and bench_sampling's count
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import bench_sampling  # noqa: E402
import gpu_threads  # noqa: E402
import gpu_training  # noqa: E402
from gpu_report import FAILURES, attempt, finish, log, sync  # noqa: E402

from sphere_ar_hf import (  # noqa: E402
    SphereARConfig,
    SphereARPipeline,
    SphereARScheduler,
    SphereARTransformer,
    SphereVAE,
    convert_official_checkpoint,
)
from sphere_ar_hf.fast_sampling import FastTokenSampler  # noqa: E402

TINY_AR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
               head_num_adaln=1, image_size=32, patch_size=16, num_classes=10, num_class_tokens=4)
TINY_VAE = dict(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
                decoder_layers=1)
SECTIONS = ("fixture", "sampling", "offload", "training")
PATHS = ("graph", "compiled", "eager")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.replace(",", " ").split()]  # noqa: E731
    words = lambda s: s.replace(",", " ").split()  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fixture", type=Path, default=ROOT.parent / "shared" / "fixtures" / "official-tiny")
    ap.add_argument("--batch-sizes", type=ints, default=[64, 256])
    ap.add_argument("--paths", type=words, default=list(PATHS),
                    help=f"sampling paths of part 2, in this order (default: {','.join(PATHS)}: the captured loop "
                         "first, so that a run cut short still has its numbers)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--profile-steps", type=int, default=20, help="steps of the profiled call (operator counts)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of SphereAR-B (CPU runs)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the fast paths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sections", type=words, default=list(SECTIONS),
                    help=f"which parts to run, comma-separated (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--train-batch", type=ints, default=None,
                    help="training batch sizes per GPU (default: 64, the official, and 128; --tiny: 8,16)")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="timed training steps per run, median reported (default: 20; --tiny: 5)")
    ap.add_argument("--train-warmup", type=int, default=None,
                    help="untimed training steps after the first one (default: 3; --tiny: 1)")
    ap.add_argument("--train-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="training autocast dtype (float32: no autocast)")
    a = ap.parse_args(argv)
    for name, full, tiny in (("train_batch", [64, 128], [8, 16]), ("train_steps", 20, 5), ("train_warmup", 3, 1)):
        if getattr(a, name) is None:
            setattr(a, name, tiny if a.tiny else full)
    for name, known in (("sections", SECTIONS), ("paths", PATHS)):
        unknown = sorted(set(getattr(a, name)) - set(known))
        if unknown:
            ap.error(f"--{name}: unknown {unknown}; expected some of {','.join(known)}")
    return a


def generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]


def class_labels(pipe: SphereARPipeline, n: int) -> list[int]:
    """``n`` spread-out class ids of ``pipe``'s model (the same for every path and run)."""
    return [(7 * i + 1) % pipe.transformer.config.num_classes for i in range(n)]


def sample(pipe: SphereARPipeline, labels: list[int], steps: int, seed: int, **kwargs) -> torch.Tensor:
    kwargs.setdefault("generator", generators(len(labels), seed))
    return pipe(labels, num_inference_steps=steps, output_type="pt", **kwargs).images.float().cpu()


def set_path(pipe: SphereARPipeline, path: str, backend: str) -> None:
    """``eager``, ``compiled`` (the compiled step, no CUDA graph) or ``graph`` (the captured token loop)."""
    if path == "eager":
        pipe.disable_torch_compile()
    else:
        pipe.enable_torch_compile(cuda_graph=path == "graph", backend=backend)


# ---- 1. the fixture ------------------------------------------------------------------------------------------
def fixture_pipeline(a: argparse.Namespace) -> SphereARPipeline:
    """The fixture's official checkpoint, converted."""
    pipe = convert_official_checkpoint(a.fixture / "ar.pt")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fixture_parity(a: argparse.Namespace, device: torch.device) -> SphereARPipeline:
    """Per sampling setting of the fixture: the eager tokens on the CPU and on ``device``, the fast path's on
    ``device``, and the device's images against the official CPU images (a path that fails is a ``FAILED`` line)."""
    from safetensors.torch import load_file

    pipe = fixture_pipeline(a)
    expected = load_file(str(a.fixture / "expected.safetensors"))
    for tag in ("cfg", "nocfg", "const"):
        seed, guidance, steps = expected[f"sample_{tag}_meta"].tolist()
        kw = dict(guidance_scale=guidance, cfg_schedule="constant" if tag == "const" else "linear",
                  num_inference_steps=int(steps), output_type="latent")
        labels = expected[f"sample_{tag}_labels"].tolist()
        on = {}
        for where, path in (("cpu", "eager"), (device.type, "eager"), (device.type, "graph")):
            with attempt(f"fixture {tag}: {path} on {where}"):
                pipe.to(where)
                set_path(pipe, path, a.compile_backend)
                g = torch.Generator().manual_seed(int(seed))
                on[where, path] = pipe(labels, generator=g, **kw).images.float().cpu()
        pipe.to(device)
        reference = ((expected[f"sample_{tag}"] + 1) / 2).clamp(0, 1)
        log(f"fixture {tag}: {fixture_line(pipe, on, reference, device.type)}")
    pipe.disable_torch_compile()
    return pipe


def fixture_line(pipe: SphereARPipeline, on: dict, reference: torch.Tensor, device: str) -> str:
    """What the paths that ran give: tokens against the CPU's, the device's images against the official ones."""
    cpu, eager, fast = on.get(("cpu", "eager")), on.get((device, "eager")), on.get((device, "graph"))
    parts = []
    if cpu is not None and eager is not None:
        parts.append(f"{device} fp32 eager tokens vs CPU: max |diff| {(eager - cpu).abs().max():.2e}")
    if cpu is not None and fast is not None:
        parts.append(f"fast path vs CPU eager: {(fast - cpu).abs().max():.2e}")
    if eager is not None:
        with torch.no_grad():
            images = (pipe.vae.to("cpu").decode(eager).sample / 2 + 0.5).clamp(0, 1)
        pipe.vae.to(pipe.transformer.device)
        d = (images - reference).abs()
        parts.append(f"{device} images vs the official CPU images: max {d.max():.2e}, mean {d.mean():.2e}")
    return "; ".join(parts) or "no path ran"


# ---- 2. throughput -------------------------------------------------------------------------------------------
def build_model(a: argparse.Namespace) -> SphereARPipeline:
    """SphereAR-B (or ``--tiny``) with random weights, all-zero tensors given small values (no trivial work)."""
    torch.manual_seed(a.seed)
    if a.tiny:
        tf, vae = SphereARTransformer(SphereARConfig(**TINY_AR)), SphereVAE(**TINY_VAE)
    else:
        tf = SphereARTransformer(SphereARConfig.from_preset("SphereAR-B", image_size=a.image_size))
        vae = SphereVAE(image_size=a.image_size)
    g = torch.Generator().manual_seed(a.seed)
    with torch.no_grad():
        for p in [*tf.parameters(), *vae.parameters()]:
            if bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pipe = SphereARPipeline(transformer=tf.eval(), vae=vae.eval(), scheduler=SphereARScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def sync_check(pipe: SphereARPipeline, device: torch.device, found: list[str]):
    """While the token loop runs (the progress bar's ``with`` block), any synchronising CUDA call raises; its
    message is appended to ``found``."""
    if device.type != "cuda":
        yield
        return
    original = pipe.progress_bar

    @contextlib.contextmanager
    def checked(iterable=None, total=None):
        with original(total=total) as bar:
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield bar
            except RuntimeError as e:
                found.append(str(e).splitlines()[0])
                raise
            finally:
                torch.cuda.set_sync_debug_mode("default")

    pipe.progress_bar = checked
    try:
        yield
    except RuntimeError:
        pass
    finally:
        del pipe.progress_bar


def host_ops(pipe: SphereARPipeline, labels: list[int], steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    kw = dict(num_inference_steps=steps, generator=generators(len(labels), 0), output_type="latent")
    pipe(labels, **kw)  # this shape's compile and graph capture happen here, not in the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe(labels, **kw)
    return bench_sampling.top_level_ops(prof.events()) / (pipe.transformer.config.num_image_tokens * (steps + 1))


def timed_batch(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device, path: str,
                b: int) -> tuple[float, torch.Tensor]:
    """One batch size of one path: a first call (the fast paths compile / capture there; eager warms up with 2
    steps), then a timed call. Prints the rate, ms per token, the first call's time and the peak memory."""
    labels = class_labels(pipe, b)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sample(pipe, labels, 2 if path == "eager" else a.steps, a.seed)
    sync(device)
    first, graphs = time.perf_counter() - t0, bench_sampling.compiled_graphs()
    t0 = time.perf_counter()
    images = sample(pipe, labels, a.steps, a.seed + 1)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    tokens = pipe.transformer.config.num_image_tokens
    compile_note = (f"; first call {first:6.1f} s (compile / capture ~{max(0.0, first - wall):5.1f} s), graphs "
                    f"compiled by the timed call: {bench_sampling.compiled_graphs() - graphs}")
    # what check_memory refuses by: the call's estimate beyond the weights (the captured graphs' pools included?)
    weights = sum(t.nbytes for m in (pipe.transformer, pipe.vae) for t in (*m.parameters(), *m.buffers())) / 2**30
    estimate = pipe.sampling_bytes(b, a.steps, guided=True, output_type="pt") / 2**30
    log(f"{path:8s} batch {b:3d}: {b / wall:8.2f} images/s, {1000 * wall / tokens:7.2f} ms/token"
        f"{compile_note if path != 'eager' else ''}; peak GPU memory {peak:.2f} GiB (weights {weights:.2f} + "
        f"the call's estimate {estimate:.2f})")
    return b / wall, images


def trunk_alone(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device, path: str, b: int) -> None:
    """The trunk steps of one call alone (guided: 2b rows), eager or compiled as ``path`` runs them: their wall time
    per token, and how long the host took to issue them. Issue time near the wall time: bound by the host (what
    capturing the trunk step as a CUDA graph would remove); far below it: bound by the GPU. Set against the whole
    call's ms per token, it says what share of a token the trunk takes."""
    tf = pipe.transformer
    # a new sampler shares the pipeline's compiled trunk step (one code object): nothing compiles again
    fast = None if path == "eager" else FastTokenSampler(cuda_graph=False, backend=a.compile_backend)
    step = tf.decode_step if fast is None else functools.partial(fast.decode_step, tf)
    labels = torch.tensor(class_labels(pipe, b) + [tf.null_class_id] * b)  # rows [conditional; unconditional]
    g = torch.Generator().manual_seed(0)
    # float32, as the sampler's tokens are (decode_step casts): the shapes and dtypes the pipeline's call compiled
    token = pipe.vae.normalize(torch.randn(2 * b, tf.config.latent_dim, generator=g)).to(device)
    graphs = bench_sampling.compiled_graphs()
    with torch.no_grad():
        cache = tf.allocate_kv_cache(2 * b, device=device)
        tf.prefill(labels.to(device), cache)
        for i in range(2):  # warm: a compiled step's first calls compile
            step(token, i, cache)
        sync(device)
        t0 = time.perf_counter()
        for i in range(tf.config.num_image_tokens - 1):
            step(token, i, cache)
        issued = time.perf_counter() - t0
        sync(device)
        wall = time.perf_counter() - t0
    tokens = tf.config.num_image_tokens - 1
    log(f"{path:8s} batch {b:3d}: trunk steps alone {1000 * wall / tokens:7.3f} ms per token (issued by the host in "
        f"{1000 * issued / tokens:7.3f} ms); graphs compiled: {bench_sampling.compiled_graphs() - graphs}")


def throughput(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device) -> dict:
    """Every path at every batch size; per path, a sync-checked call and the host operators per evaluation."""
    rates, images = {}, {}
    trunk_paths = {"eager", next((p for p in a.paths if p != "eager"), "")}  # the fast paths share one trunk step
    for path in a.paths:
        set_path(pipe, path, a.compile_backend)
        for b in a.batch_sizes:
            with attempt(f"{path} batch {b}"):
                rates[path, b], images[path, b] = timed_batch(pipe, a, device, path, b)
        if path in trunk_paths:
            with attempt(f"{path}: trunk steps alone"):
                trunk_alone(pipe, a, device, path, max(a.batch_sizes))
        small = class_labels(pipe, min(a.batch_sizes))
        with attempt(f"{path}: synchronisation check and operator count"):
            found: list[str] = []
            with sync_check(pipe, device, found):
                sample(pipe, small, a.steps, a.seed + 2)  # shapes captured / compiled above: steady state only
            ops = host_ops(pipe, small[:8], a.profile_steps)
            log(f"{path:8s}: {ops:.2f} host-issued torch operators per head evaluation (batch {len(small[:8])}, "
                f"{a.profile_steps} steps); synchronising calls inside the token loop: "
                f"{found[0] if found else 'none'}")
    pipe.disable_torch_compile()
    return {"rates": rates, "images": images}


def precision_distance(reference: SphereARPipeline, a: argparse.Namespace, path: str, images: torch.Tensor,
                       batch: int) -> None:
    """The ``--dtype`` images against those of the float32 model they were cast from (eager, same seeds)."""
    labels = class_labels(reference, batch)
    fp32 = sample(reference, labels, a.steps, a.seed + 1)
    d = (images - fp32).abs()
    log(f"{a.dtype} {path}-path images vs float32 eager (batch {batch}, same seeds): max {d.max():.3f}, mean "
        f"{d.mean():.4f}, mean per image of the largest pixel difference {d.flatten(1).amax(1).mean():.3f}")


# ---- 3. offload ----------------------------------------------------------------------------------------------
def enable_offload(pipe: SphereARPipeline, mode: str, device: torch.device) -> None:
    """diffusers' ``enable_{mode}_cpu_offload``; on the CPU the CPU stands in for the accelerator: diffusers names it
    ``cpu:0``, to which accelerate's sequential hooks cannot move a weight, so those are installed as diffusers
    installs them (``accelerate.cpu_offload`` per model) with ``cpu``."""
    if mode == "group":  # diffusers' hooks on every leaf module (the fast path declines them: eager)
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="leaf_level")
    elif device.type != "cpu":
        getattr(pipe, f"enable_{mode}_cpu_offload")()
    elif mode == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        from accelerate import cpu_offload

        for model in (pipe.transformer, pipe.vae):
            cpu_offload(model, torch.device("cpu"), offload_buffers=len(model._parameters) > 0)


def offload(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device) -> None:
    labels, kw = [1, 2, 3], dict(guidance_scale=4.0)
    pipe.to(device)
    with attempt("two requests at once"):
        log(gpu_threads.two_requests(pipe, sample, set_path, a.compile_backend, a.seed))
    references = {}
    for mode, fast in (("model", False), ("model", True), ("sequential", False), ("group", False)):
        with attempt(f"{mode} CPU offload{' + fast path' if fast else ''}"):
            set_path(pipe, "graph" if fast else "eager", a.compile_backend)
            if fast not in references:  # the same path without offload
                references[fast] = sample(pipe, labels, 20, a.seed, **kw)
            enable_offload(pipe, mode, device)
            t0 = time.perf_counter()
            images = sample(pipe, labels, 20, a.seed, **kw)
            log(f"{mode} CPU offload{' + fast path' if fast else ''}: {time.perf_counter() - t0:.1f} s, max |diff| "
                f"from no offload {(images - references[fast]).abs().max():.2e}; transformer afterwards on "
                f"{pipe.transformer.device.type}")
        if mode != "group":  # (group offload's hooks stay on: the last mode)
            pipe.remove_all_hooks()
            pipe.to(device)
    pipe.disable_torch_compile()


# ---- 4. training ---------------------------------------------------------------------------------------------
def training_config(a: argparse.Namespace) -> SphereARConfig:
    """SphereAR-B at ``--image-size``, or the tiny model with ``--tiny``."""
    return SphereARConfig(**TINY_AR) if a.tiny else SphereARConfig.from_preset("SphereAR-B", image_size=a.image_size)


def budget(a: argparse.Namespace) -> str:
    """A rough estimate of the run's minutes on an H200 (guesses until measured there). Sampling: eager is bound by
    its host, ~110 operators per head evaluation at ~10 us each, ~120 ms per token, ~30 s per 100-step call at any
    batch size; with its 4 full calls, the profile and the float32 reference about 3 min; the fast paths' compile
    (once: the compiled path reuses the graph path's compiled functions) and captures about 2.5 min more."""
    guess = {"fixture": 0.5, "sampling": 5.5, "offload": 1.2,
             "training": sum(1.2 + 0.15 * b / 64 for b in a.train_batch)}
    parts = {k: v for k, v in guess.items() if k in a.sections}
    return (f"time budget, estimated for an H200 (not measured): "
            f"{', '.join(f'{k} ~{v:.1f}' for k, v in parts.items())}; total ~{sum(parts.values()):.1f} min")


def decoder_memory(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device) -> None:
    """The VAE decoder at the largest batch, in one pass and with ``vae.enable_slicing()``: time and peak memory
    above what was allocated before (CUDA), against ``decode_bytes_per_image`` times the batch."""
    b, vae = max(a.batch_sizes), pipe.vae
    tokens = torch.randn(b, vae.num_tokens, vae.config.latent_dim, generator=torch.Generator().manual_seed(a.seed))
    tokens, parts = tokens.to(device), []
    for sliced in (False, True):
        vae.enable_slicing() if sliced else vae.disable_slicing()
        sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            vae.decode(tokens)
        sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
        parts.append(f"{'sliced' if sliced else 'one pass'} {time.perf_counter() - t0:6.2f} s, peak +{peak:.2f} GiB")
    vae.disable_slicing()
    log(f"decoder at batch {b}: {'; '.join(parts)} (estimate for one pass "
        f"{b * vae.decode_bytes_per_image() / 2**30:.2f} GiB)")


def sampling(a: argparse.Namespace, device: torch.device) -> None:
    """Part 2: throughput of every path, the 50,000-image time, the distance from float32."""
    reference = build_model(a)  # float32, kept on the CPU until the throughput has run
    pipe = copy.deepcopy(reference).to(device)
    pipe.to(DTYPES[a.dtype])
    result = throughput(pipe, a, device)
    with attempt("decoder memory"):
        decoder_memory(pipe, a, device)
    del pipe
    if result["rates"]:
        (path, b), best = max(result["rates"].items(), key=lambda item: item[1])
        log(f"50,000 images at the best rate ({best:.1f} images/s, {path} at batch {b}): "
            f"{50_000 / best / 60:.1f} minutes")
    small = min(a.batch_sizes)
    ran = [path for path in ("graph", "compiled", "eager") if (path, small) in result["images"]]
    if ran:
        with attempt("distance from float32"):
            precision_distance(reference.to(device), a, ran[0], result["images"][ran[0], small], small)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"torch {torch.__version__} on {name}; sections {','.join(a.sections)}; {a.steps} steps, batches "
        f"{a.batch_sizes}, {a.dtype}; training batches {a.train_batch}")
    if device.type == "cuda" and not a.tiny:
        log(budget(a))
    FAILURES.clear()
    fixture = None
    if {"fixture", "offload"} & set(a.sections) and (a.fixture / "ar.pt").is_file():
        with attempt("fixture"):
            fixture = fixture_parity(a, device) if "fixture" in a.sections else fixture_pipeline(a)
    elif {"fixture", "offload"} & set(a.sections):
        log(f"no fixture at {a.fixture}: part 1 skipped, part 3 runs on a tiny random model (pass --fixture)")
    if "sampling" in a.sections:
        with attempt("sampling"):
            sampling(a, device)
    if "offload" in a.sections:
        with attempt("offload"):
            offload(fixture or build_model(argparse.Namespace(**{**vars(a), "tiny": True})), a, device)
    del fixture
    if "training" in a.sections:
        with attempt("training"):
            gpu_training.training(a, training_config(a), device)
    finish()


if __name__ == "__main__":
    main()
