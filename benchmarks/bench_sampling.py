"""Sampling speed of SphereARPipeline on a SphereAR-B-sized model with random weights (fp32).

    PYTHONPATH=src python benchmarks/bench_sampling.py                      # 64 px, batches 1 8 32, 100 steps
    PYTHONPATH=src python benchmarks/bench_sampling.py --steps 20 --batch-sizes 8 --repeats 3
    PYTHONPATH=src python benchmarks/bench_sampling.py --official /tmp/official   # + the official sampler at batch 8

Prints images/s per batch size and how the time splits between the trunk (``prefill`` + ``decode_step``), the
diffusion head (``embed_condition``, ``step_modulations``, ``velocity``) and the decoder (``vae.decode``),
measured with timers wrapped around those calls. Weights are random, but the head's zero-initialised adaLN /
output layers (and every other all-zero tensor) get small random values, so that no computation is trivial and
the outputs stay finite.

``--official PATH``: a checkout of github.com/guolinke/SphereAR, e.g. from the local mirror:

    mkdir -p /tmp/official && git --git-dir=/work/.mirror/guolinke+SphereAR/repo archive HEAD | tar -x -C /tmp/official

The official model is built with the same sizes, its weights saved as an official checkpoint and converted with
``convert_official_checkpoint``, so both samplers hold identical weights; then ``model.sample(...)`` is timed
next to our pipeline at each ``--official-batch`` size (the two alternate run by run, best of ``--repeats`` each),
and the images of the first run (same seed) are compared. The official code is only imported from PATH (with
the flash_attn stand-in in /work/shared/tools/official_stub, and torch.compile disabled through
TORCHDYNAMO_DISABLE=1, since its decorators cannot compile here).

The pipeline issues the head's products with the official shapes (per step, a product of the token's rows), so
the sampled tokens agree with the official ones to the last bit at every batch size (the decoded images to ~1e-6).

At the largest batch size the head's arithmetic rate is compared with the fp32 GEMM peak of the same product
shapes on this machine, measured in the same run (each head linear's ``addmm`` alone, back to back), and with a
2048^3 GEMM.

Each line also gives the process CPU time of its fastest run: on a busy shared machine wall times swing widely
(other processes take the cores; with several threads each op waits for the slowest one), while the CPU time of a
single-threaded run (--threads 1) stays comparable between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

OFFICIAL_STUB = "/work/shared/tools/official_stub"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="sampler steps per token (default 100)")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.replace(",", " ").split()], default=[1, 8, 32],
                    help="e.g. '1,8,32' (default)")
    ap.add_argument("--guidance-scale", type=float, default=4.5)
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

from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE  # noqa: E402

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
def run_ours(pipe: SphereARPipeline, labels: list[int], a: argparse.Namespace, steps: int, seed: int):
    return pipe(labels, guidance_scale=a.guidance_scale, cfg_schedule=a.cfg_schedule, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def run_official(model, labels: list[int], a: argparse.Namespace, steps: int, seed: int):
    torch.manual_seed(seed)
    out = model.sample(torch.tensor(labels), sample_steps=steps, cfg_scale=a.guidance_scale,
                       cfg_schedule=a.cfg_schedule)
    return ((out + 1) / 2).clamp(0, 1)


class Best:
    """The fastest of several timed runs: wall seconds, process CPU seconds, and the wall-time split."""

    def __init__(self):
        self.wall, self.cpu, self.parts, self.calls = float("inf"), float("inf"), {}, {}

    def timed(self, fn, timers: Timers, *args):
        timers.reset()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if wall < self.wall:
            self.wall, self.parts, self.calls = wall, dict(timers.total), dict(timers.calls)
        self.cpu = min(self.cpu, cpu)
        return out

    def line(self, name: str, batch: int) -> str:
        return (f"{name:9s} batch {batch:3d}: {batch / self.wall:8.3f} images/s ({self.wall:7.2f} s/batch, "
                f"CPU {self.cpu:7.2f} s)  [{split_line(self.parts, self.wall)}]")


def time_runs(fn, timers: Timers, a: argparse.Namespace, batch: int) -> Best:
    labels = [(7 * i + 1) % 1000 for i in range(batch)]
    for _ in range(a.warmup):
        fn(labels, a, min(2, a.steps), a.seed)
    best = Best()
    for r in range(a.repeats):
        best.timed(fn, timers, labels, a, a.steps, a.seed + r)
    return best


def install_ours(pipe: SphereARPipeline) -> Timers:
    t = Timers()
    t.wrap(pipe.transformer, "prefill", "trunk")
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


@torch.inference_mode()
def main(a: argparse.Namespace) -> None:
    if a.threads:
        torch.set_num_threads(a.threads)
    image_size = 256 if a.full else 64
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU; SphereAR-B + S-VAE at "
          f"{image_size} px ({(image_size // 16) ** 2} tokens), {a.steps} steps, CFG {a.guidance_scale} "
          f"{a.cfg_schedule}, best of {a.repeats}", flush=True)
    model = None
    if a.official:
        model, pipe = build_official(a.official, a.official_stub, image_size, a.seed)
    else:
        pipe = build_ours(image_size, a.seed)
    pipe.set_progress_bar_config(disable=True)
    n_tf = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    n_vae = sum(p.numel() for p in pipe.vae.parameters()) / 1e6
    print(f"parameters: transformer {n_tf:.1f}M, VAE {n_vae:.1f}M", flush=True)

    timers = install_ours(pipe)
    for b in a.batch_sizes:
        best = time_runs(lambda *x: run_ours(pipe, *x), timers, a, b)
        print(best.line("ours", b), flush=True)
    timers.remove()
    if a.batch_sizes:
        b = max(a.batch_sizes)
        head_gemm_share(pipe, 2 * b if a.guidance_scale > 1 else b, best.parts["head"], best.calls["velocity"])

    if model is not None:
        for b in a.official_batch:
            compare_official(pipe, model, a, b)


def compare_official(pipe: SphereARPipeline, model, a: argparse.Namespace, b: int) -> None:
    """Ours and the official sampler at batch ``b``, alternating run by run (best of --repeats each), so that a
    change of load on the machine affects both alike; then the images of the first runs (same seed) compared."""
    labels = [(7 * i + 1) % 1000 for i in range(b)]
    timers, off_timers = install_ours(pipe), install_official(model)
    runs = {"ours": (lambda *x: run_ours(pipe, *x), timers),
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
