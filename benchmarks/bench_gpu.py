"""SphereARPipeline on a GPU, in one run (< 8 minutes on one H200): what the CPU cannot show.

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
   (64 and 256) for the eager sampler, the compiled step (``enable_torch_compile(cuda_graph=False)``) and the
   graph-captured token loop (``enable_torch_compile()``); the first call's time (compile and capture), the peak
   GPU memory; the host operators per head evaluation (torch.profiler, as benchmarks/bench_sampling.py counts
   them); whether a synchronising CUDA call ran inside the token loop (``torch.cuda.set_sync_debug_mode``); the
   bfloat16 images' distance from float32 ones (same weights and seeds, eager float32); and the time 50,000
   images would take at the best rate.
3. **Offload, end to end**: ``enable_model_cpu_offload()`` and ``enable_sequential_cpu_offload()`` on the
   fixture's pipeline (eager, and model offload with the fast path) against the same path's images without offload.
4. **A training step of SphereAR-B at 256 px from cached latents**: the trainer's step (the model's loss as
   ``SphereARTrainer.compute_loss`` calls it, ``--train-dtype`` autocast, backward, clipping, fused AdamW, EMA),
   eager and ``torch.compile``d at each ``--train-batch`` (64 and 128): median step time, images/s, first step,
   peak memory, losses; out of memory is a result line. What each number is: benchmarks/README.md.

On the CPU (``--device cpu``, with ``--tiny``: a tiny random model at 32 px) the same code runs, the offload paths
with the CPU standing in for the accelerator (``device="cpu"``), training without fused AdamW at batches 8 and 16
with 1 + 5 steps (about 45 s in all, 1 thread); tests/test_fast_sampling.py runs it so.

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
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from sphere_ar_hf import (  # noqa: E402
    SphereARConfig,
    SphereARPipeline,
    SphereARScheduler,
    SphereARTransformer,
    SphereVAE,
    convert_official_checkpoint,
)

TINY_AR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
               head_num_adaln=1, image_size=32, patch_size=16, num_classes=10, num_class_tokens=4)
TINY_VAE = dict(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
                decoder_layers=1)
SECTIONS = ("fixture", "sampling", "offload", "training")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.replace(",", " ").split()]  # noqa: E731
    words = lambda s: s.replace(",", " ").split()  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fixture", type=Path, default=ROOT.parent / "shared" / "fixtures" / "official-tiny")
    ap.add_argument("--batch-sizes", type=ints, default=[64, 256])
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
    unknown = sorted(set(a.sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; expected some of {','.join(SECTIONS)}")
    return a


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


START = time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generators(n: int, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(n)]


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
            pipe.to(where)
            set_path(pipe, path, a.compile_backend)
            g = torch.Generator().manual_seed(int(seed))
            on[where, path] = pipe(labels, generator=g, **kw).images.float().cpu()
        reference = ((expected[f"sample_{tag}"] + 1) / 2).clamp(0, 1)
        images = (pipe.vae.to("cpu").decode(on[device.type, "eager"]).sample / 2 + 0.5).clamp(0, 1)
        pipe.to(device)
        cpu, eager, fast = on["cpu", "eager"], on[device.type, "eager"], on[device.type, "graph"]
        log(f"fixture {tag}: {device.type} fp32 eager tokens vs CPU: max |diff| {(eager - cpu).abs().max():.2e}; "
            f"fast path vs CPU eager: {(fast - cpu).abs().max():.2e}; {device.type} images vs the official "
            f"CPU images: max {(images - reference).abs().max():.2e}, mean {(images - reference).abs().mean():.2e}")
    pipe.disable_torch_compile()
    return pipe


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
    import bench_sampling
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
    labels = [(7 * i + 1) % pipe.transformer.config.num_classes for i in range(b)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    sample(pipe, labels, 2 if path == "eager" else a.steps, a.seed)
    sync(device)
    first, t0 = time.perf_counter() - t0, time.perf_counter()
    images = sample(pipe, labels, a.steps, a.seed + 1)
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    tokens = pipe.transformer.config.num_image_tokens
    compile_note = f"; first call {first:6.1f} s (compile / capture ~{max(0.0, first - wall):5.1f} s)"
    log(f"{path:8s} batch {b:3d}: {b / wall:8.2f} images/s, {1000 * wall / tokens:7.2f} ms/token"
        f"{compile_note if path != 'eager' else ''}; peak GPU memory {peak:.2f} GiB")
    return b / wall, images


def throughput(pipe: SphereARPipeline, a: argparse.Namespace, device: torch.device) -> dict:
    """Every path at every batch size; per path, a sync-checked call and the host operators per evaluation."""
    rates, images = {}, {}
    for path in ("eager", "compiled", "graph"):
        set_path(pipe, path, a.compile_backend)
        for b in a.batch_sizes:
            rates[path, b], images[path, b] = timed_batch(pipe, a, device, path, b)
        small = [(7 * i + 1) % pipe.transformer.config.num_classes for i in range(min(a.batch_sizes))]
        found: list[str] = []
        with sync_check(pipe, device, found):
            sample(pipe, small, a.steps, a.seed + 2)
        ops = host_ops(pipe, small[:8], a.profile_steps)
        log(f"{path:8s}: {ops:.2f} host-issued torch operators per head evaluation (batch {len(small[:8])}, "
            f"{a.profile_steps} steps); synchronising calls inside the token loop: {found[0] if found else 'none'}")
    pipe.disable_torch_compile()
    return {"rates": rates, "images": images}


def precision_distance(reference: SphereARPipeline, a: argparse.Namespace, images: torch.Tensor,
                       batch: int) -> None:
    """The ``--dtype`` images against those of the float32 model they were cast from (eager, same seeds)."""
    labels = [(7 * i + 1) % reference.transformer.config.num_classes for i in range(batch)]
    fp32 = sample(reference, labels, a.steps, a.seed + 1)
    d = (images - fp32).abs()
    log(f"{a.dtype} graph-path images vs float32 eager (batch {batch}, same seeds): max {d.max():.3f}, mean "
        f"{d.mean():.4f}, mean per image of the largest pixel difference {d.flatten(1).amax(1).mean():.3f}")


# ---- 3. offload ----------------------------------------------------------------------------------------------
def enable_offload(pipe: SphereARPipeline, mode: str, device: torch.device) -> None:
    """diffusers' ``enable_{mode}_cpu_offload``; on the CPU the CPU stands in for the accelerator: diffusers names it
    ``cpu:0``, to which accelerate's sequential hooks cannot move a weight, so those are installed as diffusers
    installs them (``accelerate.cpu_offload`` per model) with ``cpu``."""
    if device.type != "cpu":
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
    references = {}
    for mode, fast in (("model", False), ("model", True), ("sequential", False)):
        set_path(pipe, "graph" if fast else "eager", a.compile_backend)
        if fast not in references:  # the same path without offload
            references[fast] = sample(pipe, labels, 20, a.seed, **kw)
        reference = references[fast]
        enable_offload(pipe, mode, device)
        t0 = time.perf_counter()
        images = sample(pipe, labels, 20, a.seed, **kw)
        log(f"{mode} CPU offload{' + fast path' if fast else ''}: {time.perf_counter() - t0:.1f} s, max |diff| from "
            f"no offload {(images - reference).abs().max():.2e}; transformer afterwards on "
            f"{pipe.transformer.device.type}")
        pipe.remove_all_hooks()
        pipe.to(device)
    pipe.disable_torch_compile()


# ---- 4. training ---------------------------------------------------------------------------------------------
def training_config(a: argparse.Namespace) -> SphereARConfig:
    """SphereAR-B at ``--image-size``, or the tiny model with ``--tiny``."""
    return SphereARConfig(**TINY_AR) if a.tiny else SphereARConfig.from_preset("SphereAR-B", image_size=a.image_size)


def cached_latents(config: SphereARConfig, batch: int, count: int, device: torch.device,
                   seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches as the latent cache yields them: tokens on the radius-sqrt(d) sphere, class labels."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.num_image_tokens, config.latent_dim)
    out = []
    for _ in range(count):
        x = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=-1) * config.latent_dim ** 0.5
        labels = torch.randint(0, config.num_classes, (batch,), generator=g)
        out.append((x.to(device), labels.to(device)))
    return out


class StepTimer:
    """Per-step times without synchronising inside the timed region: CUDA events on a GPU, the clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each step's time; call after the closing ``torch.cuda.synchronize``."""
        pairs = zip(self.marks, self.marks[1:])
        return [s.elapsed_time(e) / 1000 if self.cuda else e - s for s, e in pairs]


def train_run(a: argparse.Namespace, device: torch.device, batch: int, compiled: bool) -> dict:
    """The trainer's step (``model(latents=, class_labels=, generator=)`` under bf16 autocast, backward, clipping
    at 1.0, AdamW with the official groups, the EMA update) on a fresh model: the first step, ``--train-warmup``
    steps, then ``--train-steps`` timed steps."""
    from sphere_ar_hf.training.ema import ParameterEMA
    from sphere_ar_hf.training.optimization import official_param_groups

    torch.manual_seed(a.seed)
    model = SphereARTransformer(training_config(a)).to(device).train()
    optimizer = torch.optim.AdamW(official_param_groups(model, 0.05), lr=3e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    ema = ParameterEMA(model, 0.9999)
    forward = torch.compile(model, backend=a.compile_backend) if compiled else model
    generator = torch.Generator(device=device).manual_seed(a.seed)  # as the trainer's: one per process, on device
    batches = cached_latents(model.config, batch, 4, device, a.seed)
    autocast = dict(device_type=device.type, dtype=DTYPES[a.train_dtype], enabled=a.train_dtype != "float32")
    losses: list[torch.Tensor] = []

    def step(i: int) -> None:
        latents, labels = batches[i % len(batches)]
        with torch.autocast(**autocast):
            outputs = forward(latents=latents, class_labels=labels, generator=generator)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        losses.append(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    step(0)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, 1 + a.train_warmup):
        step(i)
    timer = StepTimer(device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(1 + a.train_warmup, 1 + a.train_warmup + a.train_steps):
        timer.mark()
        step(i)
    timer.mark()
    sync(device)
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(times=timer.seconds(), wall=wall, first=first, peak=peak, losses=torch.stack(losses).float().cpu())


def training(a: argparse.Namespace, device: torch.device) -> None:
    """Eager and ``torch.compile``d training steps at each ``--train-batch``; out of memory is a result line."""
    from torch._dynamo.utils import counters

    config = training_config(a)
    fused = "fused" if device.type == "cuda" else "not fused"
    log(f"training {'tiny' if a.tiny else 'SphereAR-B'} at {config.image_size} px from cached latents "
        f"({config.num_image_tokens} tokens of {config.latent_dim} dims on the radius-{config.latent_dim ** 0.5:g} "
        f"sphere, random labels): {a.train_dtype} autocast, AdamW ({fused}, official groups, lr 3e-4), clipping "
        f"1.0, EMA 0.9999; {a.train_warmup} warm-up + {a.train_steps} timed steps")
    eager_losses: dict[int, torch.Tensor] = {}
    for compiled in (False, True):
        tag = "compiled" if compiled else "eager"
        for b in a.train_batch:
            torch.compiler.reset()  # each compiled run compiles its own static shapes, as a training run would
            graphs = counters["stats"]["unique_graphs"]
            try:
                r = train_run(a, device, b, compiled)
                r["graphs"] = counters["stats"]["unique_graphs"] - graphs
            except torch.cuda.OutOfMemoryError as e:
                log(f"training {tag:8s} batch {b:3d}: out of memory ({str(e).splitlines()[0][:120]})")
                continue
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(training_line(a, tag, b, r, eager_losses.get(b)))
            eager_losses.setdefault(b, r["losses"])


def training_line(a: argparse.Namespace, tag: str, b: int, r: dict, eager: torch.Tensor | None) -> str:
    """One run's result line: step time, images/s, first step, peak memory, the losses."""
    median, losses = statistics.median(r["times"]), r["losses"]
    peak = "n/a" if r["peak"] != r["peak"] else f"{r['peak']:.2f} GiB"
    extra = ""
    if tag == "compiled":
        extra = f"; {r['graphs']} graphs compiled (graph breaks + 1)"
        if eager is not None:
            extra += f", max |loss - eager loss| over the steps {(losses - eager).abs().max():.2e}"
    return (f"training {tag:8s} batch {b:3d}: step {1000 * median:8.2f} ms (median of {len(r['times'])}; mean "
            f"{1000 * r['wall'] / a.train_steps:.2f}), {b / median:8.1f} images/s, first step {r['first']:6.1f} s, "
            f"peak GPU memory {peak}; loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of the last {a.train_steps}: "
            f"{losses[-a.train_steps:].mean():.4f}, finite: {bool(losses.isfinite().all())}){extra}")


def budget(a: argparse.Namespace) -> str:
    """A rough estimate of the run's minutes on an H200 (guesses until measured there; the compiles dominate)."""
    guess = {"fixture": 0.5, "sampling": 3.5, "offload": 0.5,
             "training": sum(1.2 + 0.15 * b / 64 for b in a.train_batch)}
    parts = {k: v for k, v in guess.items() if k in a.sections}
    return (f"time budget, estimated for an H200 (not measured): "
            f"{', '.join(f'{k} ~{v:.1f}' for k, v in parts.items())}; total ~{sum(parts.values()):.1f} min")


def sampling(a: argparse.Namespace, device: torch.device) -> None:
    """Part 2: throughput of every path, the 50,000-image time, the distance from float32."""
    reference = build_model(a)  # float32, kept on the CPU until the throughput has run
    pipe = copy.deepcopy(reference).to(device)
    pipe.to(DTYPES[a.dtype])
    result = throughput(pipe, a, device)
    best = max(result["rates"].values())
    log(f"50,000 images at the best rate ({best:.1f} images/s): {50_000 / best / 60:.1f} minutes")
    del pipe
    small = min(a.batch_sizes)
    precision_distance(reference.to(device), a, result["images"]["graph", small], small)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(a.device)
    sys.path.insert(0, str(Path(__file__).parent))  # bench_sampling's operator count
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"torch {torch.__version__} on {name}; sections {','.join(a.sections)}; {a.steps} steps, batches "
        f"{a.batch_sizes}, {a.dtype}; training batches {a.train_batch}")
    if device.type == "cuda" and not a.tiny:
        log(budget(a))
    fixture = None
    if {"fixture", "offload"} & set(a.sections) and (a.fixture / "ar.pt").is_file():
        fixture = fixture_parity(a, device) if "fixture" in a.sections else fixture_pipeline(a)
    elif {"fixture", "offload"} & set(a.sections):
        log(f"no fixture at {a.fixture}: part 1 skipped, part 3 runs on a tiny random model (pass --fixture)")
    if "sampling" in a.sections:
        sampling(a, device)
    if "offload" in a.sections:
        offload(fixture or build_model(argparse.Namespace(**{**vars(a), "tiny": True})), a, device)
    del fixture
    if "training" in a.sections:
        training(a, device)
    log("done")


if __name__ == "__main__":
    main()
