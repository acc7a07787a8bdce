"""How much precision / recall move when the pairwise distances are float16, as in the ADM evaluator.

    PYTHONPATH=src python benchmarks/pr_float16.py [--num 10000] [--dim 2048] [--seeds 0 1 2]

The ADM evaluator (TensorFlow) computes ``|u|^2 - 2 u.v + |v|^2`` with float16 inputs and outputs (float32 only
where that overflows); ``sphere_ar_hf.evaluation.precision_recall`` uses float32. This script emulates the float16
path (inputs rounded to float16, each of the three terms and the two sums rounded to float16, products accumulated
in float32 as GPU kernels do) and compares both on synthetic features shaped like Inception pool_3 features
(non-negative ReLU outputs of correlated Gaussians, squared norms in the hundreds): an emulation, not a run of the
TF evaluator. Prints precision and recall of each and their differences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf.evaluation import precision_recall  # noqa: E402


def features(n: int, dim: int, shift: float, rng: np.random.Generator, mix: np.ndarray) -> np.ndarray:
    z = rng.standard_normal((n, mix.shape[1])).astype(np.float32)
    return np.maximum(z @ mix.T + 0.2 + shift, 0.0).astype(np.float32)


def f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def adm_float16_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a16, b16 = f16(a), f16(b)
    na, nb = f16(a16.square().sum(1)), f16(b16.square().sum(1))
    cross = f16(a16 @ b16.T)
    d = f16(f16(na[:, None] - 2 * cross) + nb[None]).clamp_(min=0.0)
    return d if torch.isfinite(d).all() else (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1))


def adm_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, block: int = 2000) -> tuple[float, float]:
    def radii(f):
        return torch.cat([adm_float16_distances(f[i:i + block], f).kthvalue(k + 1, 1).values
                          for i in range(0, len(f), block)])

    def coverage(points, centers, r):
        return float(torch.cat([(adm_float16_distances(points[i:i + block], centers) <= r[None]).any(1)
                                for i in range(0, len(points), block)]).double().mean())

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shift", type=float, default=0.03, help="mean shift of the 'generated' features")
    args = ap.parse_args(argv)
    print("| seed | precision fp32 | precision fp16 (ADM) | recall fp32 | recall fp16 (ADM) | squared norms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    diffs = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        mix = (rng.standard_normal((args.dim, 64)) * 0.08).astype(np.float32)
        real, fake = features(args.num, args.dim, 0.0, rng, mix), features(args.num, args.dim, args.shift, rng, mix)
        ours = precision_recall(real, fake, batch_size=2000)
        theirs = adm_precision_recall(torch.from_numpy(real), torch.from_numpy(fake))
        diffs.append((ours[0] - theirs[0], ours[1] - theirs[1]))
        print(f"| {seed} | {ours[0]:.4f} | {theirs[0]:.4f} | {ours[1]:.4f} | {theirs[1]:.4f} | "
              f"{np.square(real).sum(1).mean():.0f} |", flush=True)
    d = np.abs(np.array(diffs))
    print(f"\nmax |difference|: precision {d[:, 0].max():.4f}, recall {d[:, 1].max():.4f}")


if __name__ == "__main__":
    main()
