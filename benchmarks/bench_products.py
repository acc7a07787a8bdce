"""The fast sampler's short products on the CPU: a head's residual blocks at a few rows, BLAS against generated code.

    python benchmarks/bench_products.py --threads 1                       # SphereAR-B's head, rows 1 2 4 8
    python benchmarks/bench_products.py --threads 2 --preset SphereAR-H --rows 2

Guided sampling at batch 1 evaluates the head on 2 rows: each of its blocks' products (``w1``: width -> 3 x width,
``w2``: 1.5 x width -> width) only streams its weight, but BLAS (MKL here) runs it as a GEMM. The fast sampler's
inductor pass (:mod:`sphere_ar_hf.thin_products`) writes every product of 1 to 4 rows as one sum per row, which
inductor fuses into one loop reading the weight once. Per row count this script compiles the head's blocks (random
weights, fp32) twice, with inductor's own BLAS calls (``blas``) and with the pass (``generated``), and prints for
each the best time per evaluation of all blocks, the rate at which it streams the blocks' weights (GB/s), the host
operators it issues, and the largest difference from eager. ``read`` is the reference rate: one ``sum`` over a
tensor of the weights' size (what reading that memory once costs). On this project's CPU the weights of
SphereAR-B's blocks (64 MB) exceed the 32 MB L3, so every evaluation reads them from memory.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

from sphere_ar_hf.configuration_sphere_ar import PRESETS
from sphere_ar_hf.modeling_sphere_ar import HeadResBlock
from sphere_ar_hf.thin_products import ThinProducts

if str(Path(__file__).resolve().parent) not in sys.path:  # bench_sampling's timer, when loaded from its path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import best_seconds  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="SphereAR-B", choices=sorted(PRESETS), help="the head's width and depth")
    ap.add_argument("--width", type=int, help="instead of the preset's: the head's width")
    ap.add_argument("--layers", type=int, help="instead of the preset's: the head's number of blocks")
    ap.add_argument("--rows", default="1,2,4,8", help="row counts, comma-separated")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (best of) of --inner evaluations")
    ap.add_argument("--inner", type=int, default=10)
    a = ap.parse_args(argv)
    a.rows = [int(r) for r in a.rows.split(",")]
    a.width = a.width or PRESETS[a.preset]["head_hidden_size"]
    a.layers = a.layers or PRESETS[a.preset]["head_num_layers"]
    return a


def host_operators(fn) -> int:
    """The matrix products (``aten::mm``/``aten::addmm``) one call of ``fn`` issues from the host."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("aten::mm", "aten::addmm") for e in prof.events())


@torch.inference_mode()
def main(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(HeadResBlock(a.width) for _ in range(a.layers)).eval()
    for p in blocks.parameters():
        p.normal_(0, 0.03)  # the blocks' output layers start at zero; every product does work here
    nbytes = sum(p.numel() * p.element_size() for p in blocks.parameters())
    flat = torch.randn(nbytes // 4)
    read = best_seconds(lambda: flat.sum(), a.repeats, a.inner)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; head width {a.width}, {a.layers} "
          f"blocks, weights {nbytes / 2**20:.1f} MiB; read (one sum over them) {1e3 * read:.3f} ms = "
          f"{nbytes / read / 1e9:.1f} GB/s", flush=True)

    def chain(x: torch.Tensor, mods: list[torch.Tensor]) -> torch.Tensor:
        for block in blocks:
            x = block(x, *mods)
        return x

    for rows in a.rows:
        x, mods = torch.randn(rows, a.width), [0.1 * torch.randn(rows, a.width) for _ in range(3)]
        eager = chain(x, mods)
        line = []
        for name, options in (("blas", {}), ("generated", {"post_grad_custom_pre_pass": ThinProducts()})):
            torch._dynamo.reset()
            compiled = torch.compile(chain, fullgraph=True, dynamic=False, options=options)
            call = functools.partial(compiled, x, mods)
            diff = ((call() - eager).abs().max() / eager.abs().max()).item()
            seconds = best_seconds(call, a.repeats, a.inner)
            line.append(f"{name} {1e3 * seconds:.3f} ms ({nbytes / seconds / 1e9:.1f} GB/s, "
                        f"{host_operators(call)} products issued, difference {diff:.1e})")
        print(f"rows {rows}: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main(parse_args())
