"""Sampling speed of SphereARPipeline, eager and the fast path (``enable_torch_compile``), fp32 on the CPU.

    python benchmarks/bench_sampling.py --threads 1 --models digits,B --paths eager,fast --count-ops --fd 1000
    python benchmarks/bench_sampling.py                                     # B at 64 px, eager, batches 1 8 32
    python benchmarks/bench_sampling.py --steps 20 --batch-sizes 8 --repeats 3
    python benchmarks/bench_sampling.py --official /tmp/official   # + the official sampler at batch 8 (B)

Models: ``digits`` is the bundled digits model (4 tokens of 16 px images); ``B`` a SphereAR-B-sized model with random
weights at 64 px (16 tokens; ``--full``: 256 px, 256 tokens). Weights are random, but the head's zero-initialised
adaLN / output layers (and every other all-zero tensor) get small random values, so that no computation is
trivial and the outputs stay finite. Every image has its own generator (as ``sphere-ar sample`` draws them).

Per model, path (``eager``; ``fast`` = ``pipe.enable_torch_compile()``) and batch size: images/s, ms per token, and
how the time splits between the trunk (``prefill`` + ``decode_step``), the diffusion head and the decoder
(``vae.decode``), measured with timers wrapped around those calls (the fast path's head is compiled: its time is
what the trunk and decoder leave). The fast path's first call compiles: its wall time minus a warm call's is the
compile time; the graphs dynamo compiled on later calls (recompiles) are counted and must be 0.

``--count-ops``: host-issued torch operators per head evaluation: the top-level torch operators (``aten::`` or any
other dispatcher namespace, not called by another operator; inside a compiled region, the extern kernels such as
its matrix products) that
``torch.profiler`` records over one whole pipeline call (``output_type="latent"``: setup and token loop, no
decoder), divided by the call's head evaluations (tokens x evaluations per token).

``--fd N``: the digits model's Fréchet distance (eval_digits.py's feature space) of N images for ``--fd-seeds``
seeds, eager and fast (mean ± std, SE, the paired difference), and how far the fast images are from eager's.

``--official PATH``: a checkout of github.com/guolinke/SphereAR, e.g. from the local mirror:

    mkdir -p /tmp/official && git --git-dir=/work/.mirror/guolinke+SphereAR/repo archive HEAD | tar -x -C /tmp/official

The official model is built with the same sizes, its weights saved as an official checkpoint and converted with
``convert_official_checkpoint``, so both samplers hold identical weights; then ``model.sample(...)`` is timed
next to our pipeline at each ``--official-batch`` size (the two alternate run by run, best of ``--repeats`` each),
and the images of the first run (same seed) are compared. The official code is only imported from PATH (with
the flash_attn stand-in in /work/shared/tools/official_stub, and torch.compile disabled through
TORCHDYNAMO_DISABLE=1, since its decorators cannot compile here). The eager pipeline issues the head's products
with the official shapes, so its tokens agree with the official ones to the last bit at every batch size.

At the largest batch size of an eager B run the head's arithmetic rate is compared with the fp32 GEMM peak of the
same product shapes on this machine, measured in the same run (each head linear's ``addmm`` alone), and with a
2048^3 GEMM. Each line also gives the process CPU time of its fastest run: on a busy shared machine wall times
swing widely, while the CPU time of a single-threaded run (--threads 1) stays comparable between runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

OFFICIAL_STUB = "/work/shared/tools/official_stub"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = lambda s: [x for x in s.replace(",", " ").split()]  # noqa: E731
    ap.add_argument("--models", type=names, default=["B"], help="'B' (default), 'digits' or 'digits,B'")
    ap.add_argument("--paths", type=names, default=["eager"], help="'eager' (default), 'fast' or 'eager,fast'")
    ap.add_argument("--count-ops", action="store_true", help="host-issued torch operators per head evaluation")
    ap.add_argument("--fd", type=int, default=0, metavar="N", help="digits: Fréchet distances of N images per seed")
    ap.add_argument("--fd-seeds", type=int, default=8, metavar="S", help="with --fd: seeds 0 .. S-1 (default 8)")
    ap.add_argument("--steps", type=int, default=100, help="sampler steps per token (default 100)")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.replace(",", " ").split()], default=[1, 8, 32],
                    help="e.g. '1,8,32' (default)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the model's recommended scale")
    ap.add_argument("--cfg-schedule", default="linear", choices=["linear", "constant"])
    ap.add_argument("--full", action="store_true", help="256 px images (256 tokens) instead of 64 px (16 tokens)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (the best is reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size (with --steps 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official", metavar="PATH", default=None, help="checkout of the official SphereAR code")
    ap.add_argument("--official-batch", type=lambda s: [int(x) for x in s.replace(",", " ").split()], default=[8],
                    help="batch size(s) of the side-by-side comparison, e.g. '8' (default) or '1,8,32'")
    ap.add_argument("--official-stub", default=OFFICIAL_STUB, help="folder with the flash_attn stand-in")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.official:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # before torch is imported: the official torch.compile decorators

import torch  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf import (  # noqa: E402
    SphereARConfig,
    SphereARPipeline,
    SphereARScheduler,
    SphereARTransformer,
    SphereVAE,
    bundled_model_path,
)

B_SIZES = dict(dim=768, n_layer=24, n_head=12, diff_layers=6, diff_dim=768, diff_adanln_layers=2)


# ---- timers ------------------------------------------------------------------------------------------------
class Timers:
    """Accumulated wall time per part, from wrappers installed around bound methods (instance attributes)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self._undo = []

    def wrap(self, obj, name: str, part: str) -> None:
        fn = getattr(obj, name)
        acc, calls = self.total, self.calls

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[part] += time.perf_counter() - t0
                calls[name] += 1

        obj.__dict__[name] = timed  # an instance attribute shadows the method; removed by remove()
        self._undo.append((obj, name))

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()

    def remove(self) -> None:
        for obj, name in self._undo:
            obj.__dict__.pop(name, None)
        self._undo.clear()


def split_line(parts: dict[str, float], total: float, names=("trunk", "head", "decoder")) -> str:
    other = total - sum(parts.get(n, 0.0) for n in names)
    cells = [f"{n} {parts.get(n, 0.0):6.2f}s ({100 * parts.get(n, 0.0) / total:4.1f}%)" for n in names]
    cells.append(f"other {other:5.2f}s ({100 * other / total:4.1f}%)")
    return " | ".join(cells)


# ---- models ------------------------------------------------------------------------------------------------
@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Give all-zero float tensors (zero-initialised adaLN / output layers, biases, register tokens) small random
    values and jitter all-one norm scales, as the official fixture builder does: realistic work, finite outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or "freqs_cis" in name:
            continue
        if torch.all(t == 0):
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        elif torch.all(t == 1):
            t.add_(torch.randn(t.shape, generator=g) * 0.1)


def build_ours(image_size: int, seed: int) -> SphereARPipeline:
    torch.manual_seed(seed)
    tf = SphereARTransformer(SphereARConfig.from_preset("SphereAR-B", image_size=image_size))
    vae = SphereVAE(image_size=image_size)
    perturb_(tf, seed + 100)
    perturb_(vae, seed + 200)
    return SphereARPipeline(transformer=tf.eval(), vae=vae.eval(), scheduler=SphereARScheduler())


def build_official(path: str, stub: str, image_size: int, seed: int):
    """The official ``SphereAR`` (B sizes, official VAE defaults) and our pipeline converted from its weights."""
    import argparse as _ap

    from sphere_ar_hf import convert_official_checkpoint

    for p in (stub, path):
        if p not in sys.path:
            sys.path.insert(0, p)
    import SphereAR.model as ref_model  # the official code, imported from PATH only

    torch.manual_seed(seed)
    model = ref_model.SphereAR(**B_SIZES, latent_dim=16, patch_size=16, resolution=image_size, diff_batch_mul=4,
                               cls_token_num=16, num_classes=1000)
    perturb_(model, seed + 100)
    model.eval()
    args = _ap.Namespace(model="SphereAR-B", image_size=image_size, patch_size=16, latent_dim=16, cls_token_num=16,
                         num_classes=1000, vae_only=False, diff_batch_mul=4, ema=0.9999)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ar.pt")
        torch.save({"ema": model.state_dict(), "epochs": 1, "args": args}, ckpt)
        pipe = convert_official_checkpoint(ckpt)
    return model, pipe


# ---- the head against the GEMM peak -----------------------------------------------------------------------
def head_linears(head) -> list[torch.nn.Linear]:
    """The linears of one head evaluation (:meth:`DiffusionHead.velocity`), in order."""
    return [head.input_proj, *head.adaln, *(m for blk in head.res_blocks for m in (blk.w1, blk.w2)),
            head.final_adaln, head.final_linear]


def best_seconds(fn, repeats: int = 5, inner: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


@torch.inference_mode()
def head_gemm_share(pipe: SphereARPipeline, rows: int, head_seconds: float, calls: int) -> None:
    """Print the head's fp32 FLOP rate in the timed run next to the GEMM peak of its own shapes (same machine,
    same run): the rate of each of its linears' ``addmm`` on ``rows`` rows alone, issued back to back."""
    linears = head_linears(pipe.transformer.head)
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)  # per evaluation (matmuls only)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, m.in_features, generator=g) for m in linears]

    def products() -> None:
        for m, x in zip(linears, inputs):
            torch.addmm(m.bias, x, m.weight.t())

    peak = flops / best_seconds(products)
    big = torch.randn(2048, 2048, generator=g)
    square = 2 * 2048**3 / best_seconds(lambda: big @ big, repeats=3, inner=3)
    achieved = flops * calls / head_seconds
    print(f"head at {rows} rows: {achieved / 1e9:.1f} GFLOP/s over {calls} evaluations (timed run, incl. norms and "
          f"elementwise ops) = {100 * achieved / peak:.1f}% of the fp32 GEMM peak of its own shapes "
          f"({peak / 1e9:.1f} GFLOP/s, linears alone), {100 * achieved / square:.1f}% of a 2048^3 GEMM "
          f"({square / 1e9:.1f} GFLOP/s)", flush=True)


# ---- runs --------------------------------------------------------------------------------------------------
def generators(labels: list[int], seed: int, per_image: bool) -> torch.Generator | list[torch.Generator]:
    if not per_image:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(labels))]


def run_ours(pipe: SphereARPipeline, labels: list[int], a: argparse.Namespace, steps: int, seed: int,
             per_image: bool = True, output_type: str = "pt"):
    return pipe(labels, guidance_scale=a.guidance_scale, cfg_schedule=a.cfg_schedule, num_inference_steps=steps,
                generator=generators(labels, seed, per_image), output_type=output_type).images


# ---- host calls --------------------------------------------------------------------------------------------
TORCH_OP = re.compile(r"^\w+::\w+")  # a dispatcher operator's profiler event: aten::addmm, mkldnn::..., prims::...


def top_level_ops(events) -> int:
    """The torch operators among profiler ``events`` (``aten::``, ``mkldnn::``, any dispatcher namespace) that no
    other operator called: one host-side dispatch each (a compiled region's are its extern kernels, such as its
    matrix products: the fused code it runs itself is not counted)."""
    count = 0
    for e in events:
        if TORCH_OP.match(e.name):
            parent = e.cpu_parent
            while parent is not None and not TORCH_OP.match(parent.name):
                parent = parent.cpu_parent
            count += parent is None
    return count


def host_ops_per_evaluation(pipe: SphereARPipeline, labels: list[int], steps: int, **call_kwargs) -> float:
    """Top-level torch operators of one whole pipeline call (``output_type="latent"``: setup and token loop) per
    head evaluation (tokens x evaluations per token); ``call_kwargs`` go to the pipeline."""
    from torch.profiler import ProfilerActivity, profile

    call_kwargs.setdefault("generator", generators(labels, 0, True))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pipe(labels, num_inference_steps=steps, output_type="latent", **call_kwargs)
    scheduler = SphereARScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return top_level_ops(prof.events()) / (pipe.transformer.config.num_image_tokens * len(scheduler))


def run_official(model, labels: list[int], a: argparse.Namespace, steps: int, seed: int):
    torch.manual_seed(seed)
    out = model.sample(torch.tensor(labels), sample_steps=steps, cfg_scale=a.guidance_scale,
                       cfg_schedule=a.cfg_schedule)
    return ((out + 1) / 2).clamp(0, 1)


class Best:
    """The fastest of several timed runs: wall seconds, process CPU seconds, the wall-time split, and the images
    of the first run."""

    def __init__(self):
        self.wall, self.cpu, self.parts, self.calls, self.images = float("inf"), float("inf"), {}, {}, None

    def timed(self, fn, timers: Timers, *args):
        timers.reset()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < self.wall:
            self.wall, self.parts, self.calls = wall, dict(timers.total), dict(timers.calls)
        self.cpu = min(self.cpu, cpu)
        if self.images is None:
            self.images = out
        return out

    def line(self, name: str, batch: int, tokens: int | None = None) -> str:
        parts = dict(self.parts)
        parts.setdefault("head", self.wall - parts.get("trunk", 0.0) - parts.get("decoder", 0.0))
        per_token = f", {1000 * self.wall / tokens:7.2f} ms/token" if tokens else ""
        return (f"{name:9s} batch {batch:3d}: {batch / self.wall:8.3f} images/s ({self.wall:7.2f} s/batch{per_token}, "
                f"CPU {self.cpu:7.2f} s)  [{split_line(parts, self.wall)}]")


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def time_runs(fn, timers: Timers, a: argparse.Namespace, batch: int, name: str = "", num_classes: int = 1000) -> Best:
    """Best of ``--repeats`` timed runs after ``--warmup`` untimed ones; for the fast path (``name``) the first
    call's time, the graphs it compiled, and the graphs compiled by the later calls (recompiles) are printed."""
    labels = [(7 * i + 1) % num_classes for i in range(batch)]
    graphs, t0 = compiled_graphs(), time.perf_counter()
    for _ in range(a.warmup):
        fn(labels, a, a.steps if name else min(2, a.steps), a.seed)
    first, compiled = time.perf_counter() - t0, compiled_graphs() - graphs
    best = Best()
    for r in range(a.repeats):
        best.timed(fn, timers, labels, a, a.steps, a.seed + r)
    if name:
        print(f"{name} batch {batch:3d}: warm-up call {first:.1f} s ({compiled} graphs compiled; compile time ~ "
              f"{max(0.0, first - best.wall):.1f} s), graphs compiled by the {a.repeats} timed calls: "
              f"{compiled_graphs() - graphs - compiled}", flush=True)
    return best


def install_ours(pipe: SphereARPipeline, fast: bool = False) -> Timers:
    """Timers on the trunk and decoder calls, and on the head's (eager). The fast path's trunk step is timed around
    its compiled sampler's ``decode_step`` (a wrapper on the transformer's would be traced into the compiled step);
    its head runs compiled, and the head's time is then what the others leave."""
    t = Timers()
    t.wrap(pipe.transformer, "prefill", "trunk")
    if fast:
        t.wrap(pipe._compiled_sampler, "decode_step", "trunk")
    else:
        t.wrap(pipe.transformer, "decode_step", "trunk")
        t.wrap(pipe.transformer.head, "embed_condition", "head")
        t.wrap(pipe.transformer.head, "step_modulations", "head")
        t.wrap(pipe.transformer.head, "velocity", "head")
    t.wrap(pipe.vae, "decode", "decoder")
    return t


def install_official(model) -> Timers:
    t = Timers()
    t.wrap(model, "forward_model", "trunk")
    t.wrap(model, "head_sample", "head")
    t.wrap(model.vae, "decode", "decoder")
    return t


def build_model(name: str, a: argparse.Namespace) -> SphereARPipeline:
    if name == "digits":
        return SphereARPipeline.from_pretrained(bundled_model_path("digits"))
    if name == "B":
        return build_ours(256 if a.full else 64, a.seed)
    raise SystemExit(f"--models: unknown model {name!r}; expected 'digits' or 'B'")


def set_path(pipe: SphereARPipeline, path: str) -> None:
    if path not in ("eager", "fast"):
        raise SystemExit(f"--paths: unknown path {path!r}; expected 'eager' or 'fast'")
    pipe.enable_torch_compile() if path == "fast" else pipe.disable_torch_compile()


def bench_model(name: str, pipe: SphereARPipeline, a: argparse.Namespace) -> None:
    """Every path and batch size of one model: times, host operators per evaluation, agreement of the paths."""
    tokens = pipe.transformer.config.num_image_tokens
    n_tf = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    print(f"\n{name}: {tokens} tokens, transformer {n_tf:.1f}M parameters, guidance {a.guidance_scale} "
          f"{a.cfg_schedule}, {a.steps} steps", flush=True)
    runs = {}
    for path in a.paths:
        set_path(pipe, path)
        timers = install_ours(pipe, fast=path == "fast")

        def run(labels, a_, steps, seed):
            return run_ours(pipe, labels, a_, steps, seed)

        for b in a.batch_sizes:
            runs[path, b] = time_runs(run, timers, a, b, "fast" if path == "fast" else "",
                                      pipe.transformer.config.num_classes)
            print(runs[path, b].line(path, b, tokens), flush=True)
        timers.remove()
        if a.count_ops:
            labels = [i % pipe.transformer.config.num_classes for i in range(min(a.batch_sizes))]
            ops = host_ops_per_evaluation(pipe, labels, a.steps, guidance_scale=a.guidance_scale,
                                          cfg_schedule=a.cfg_schedule)
            print(f"{path}: {ops:.2f} host-issued torch operators per head evaluation (batch {len(labels)}, whole "
                  "call)", flush=True)
        if path == "eager" and name == "B" and a.batch_sizes:
            b, best = max(a.batch_sizes), runs["eager", max(a.batch_sizes)]
            head_gemm_share(pipe, 2 * b if a.guidance_scale > 1 else b, best.parts["head"], best.calls["velocity"])
    for b in a.batch_sizes:
        if ("eager", b) in runs and ("fast", b) in runs:
            eager, fast = runs["eager", b], runs["fast", b]
            diff = (fast.images - eager.images).abs().max().item()
            print(f"batch {b}: fast / eager = {eager.wall / fast.wall:.2f}x per token; largest image difference "
                  f"(same seeds, [0, 1] scale) {diff:.2e}", flush=True)
    pipe.disable_torch_compile()


def frechet_report(pipe: SphereARPipeline, a: argparse.Namespace) -> None:
    """``--fd``: the digits Fréchet distances of both paths and their uint8 images' differences (module docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_digits", Path(__file__).with_name("eval_digits.py"))
    ed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ed)
    extractor = ed.DigitFeatures(pipe.vae.config.image_size)
    images, fds, seeds = {}, {}, range(a.fd_seeds)
    for path in ("eager", "fast"):
        set_path(pipe, path)
        for seed in seeds:
            images[path, seed], labels, _ = ed.generate(pipe, a.fd, seed, max(a.batch_sizes), a.guidance_scale,
                                                        a.steps)
            fds[path, seed] = ed.evaluate_digits(ed.ImageSet.from_arrays(images[path, seed], labels),
                                                 extractor=extractor, with_precision_recall=False)["frechet_distance"]
        values = [fds[path, seed] for seed in seeds]
        print(f"digits Fréchet distance, {a.fd} images, seeds 0..{a.fd_seeds - 1}, {path}: "
              + ", ".join(f"{fd:.3f}" for fd in values) + f"; {ed.mean_std_se(values)}", flush=True)
    diffs = [fds["fast", seed] - fds["eager", seed] for seed in seeds]
    print(f"digits Fréchet distance, fast - eager (same seed): {ed.mean_std_se(diffs, '.1e')}; largest |difference| "
          f"{max(abs(d) for d in diffs):.1e}", flush=True)
    for seed in seeds:
        d = abs(images["fast", seed].astype(int) - images["eager", seed].astype(int))
        print(f"seed {seed}: fast vs eager uint8 images: max difference {d.max()} levels, "
              f"{100 * (d > 0).mean():.3f}% of the values differ", flush=True)
    pipe.disable_torch_compile()


@torch.inference_mode()
def main(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, best of {a.repeats}", flush=True)
    if a.official:
        image_size = 256 if a.full else 64
        model, pipe = build_official(a.official, a.official_stub, image_size, a.seed)
        pipe.set_progress_bar_config(disable=True)
        a.guidance_scale = 4.5 if a.guidance_scale is None else a.guidance_scale
        for b in a.official_batch:
            compare_official(pipe, model, a, b)
        return
    default_guidance = a.guidance_scale
    for name in a.models:
        pipe = build_model(name, a)
        pipe.set_progress_bar_config(disable=True)
        if default_guidance is None:
            a.guidance_scale = float(pipe.transformer.config.guidance_scale)
        bench_model(name, pipe, a)
        if a.fd and name == "digits":
            frechet_report(pipe, a)


def compare_official(pipe: SphereARPipeline, model, a: argparse.Namespace, b: int) -> None:
    """Ours and the official sampler at batch ``b``, alternating run by run (best of --repeats each), so that a
    change of load on the machine affects both alike; then the images of the first runs (same seed) compared."""
    labels = [(7 * i + 1) % 1000 for i in range(b)]
    timers, off_timers = install_ours(pipe), install_official(model)
    runs = {"ours": (lambda *x: run_ours(pipe, *x, per_image=False), timers),
            "official": (lambda *x: run_official(model, *x), off_timers)}
    for fn, _ in runs.values():
        for _ in range(a.warmup):
            fn(labels, a, min(2, a.steps), a.seed)
    best = {name: Best() for name in runs}
    images = {}
    for r in range(a.repeats):
        for name, (fn, tm) in runs.items():
            img = best[name].timed(fn, tm, labels, a, a.steps, a.seed + r)
            if r == 0:
                images[name] = img
    timers.remove()
    off_timers.remove()
    for name in runs:
        print(best[name].line(name, b), flush=True)
    ours, off = best["ours"], best["official"]
    print(f"speed-up at batch {b}: ours / official = {off.wall / ours.wall:.3f}x by wall time "
          f"({b / ours.wall:.3f} vs {b / off.wall:.3f} images/s), {off.cpu / ours.cpu:.3f}x by CPU time", flush=True)
    diff = (images["ours"] - images["official"]).abs()
    print(f"same seed, same weights (batch {b}, {a.steps} steps): max abs diff {diff.max().item():.3e}, "
          f"mean abs diff {diff.mean().item():.3e} (images in [0, 1])", flush=True)

if __name__ == "__main__":
    main(ARGS)
