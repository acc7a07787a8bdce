"""Sampling speed with 1 and 2 torch threads: the measurement behind the CLI's default ``--threads``.

    PYTHONPATH=src python benchmarks/bench_threads.py                       # the full table (about 15 min)
    PYTHONPATH=src python benchmarks/bench_threads.py --models digits --batch-sizes 1 32 --repeats 1

For each model (the embedded ``digits`` model at its recipe's 100 steps, guidance 2; ``b64``: a SphereAR-B-sized
pipeline with random weights at 64 px, 16 tokens, guidance 4.5, ``--b-steps`` steps, since at 100 steps one batch
of 500 takes over half an hour on one core), each batch size and each thread count, the pipeline samples one batch
(per-image generators, as ``sphere-ar sample`` does) after an untimed warm-up run; the best of ``--repeats`` runs
is reported as images/s, alternating the thread counts run by run so that a change of load affects both alike.
The images of the thread counts are compared (maximum absolute difference, images in [0, 1]).

Run it on a quiet machine: with another busy process on one of two cores, two threads wait for each other at
every operation and lose several-fold.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_sampling import build_ours  # noqa: E402

from sphere_ar_hf import SphereARPipeline, bundled_model_path  # noqa: E402
from sphere_ar_hf.seeding import image_generators  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", choices=("digits", "b64"), default=["digits", "b64"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32, 500])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--digits-steps", type=int, default=100, help="sampler steps per token, digits model")
    p.add_argument("--b-steps", type=int, default=20, help="sampler steps per token, SphereAR-B at 64 px")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the best is reported)")
    return p.parse_args(argv)


def load(name: str) -> tuple[SphereARPipeline, float, int]:
    """The pipeline, its guidance scale and its number of classes."""
    if name == "digits":
        pipe = SphereARPipeline.from_pretrained(bundled_model_path("digits"))
        return pipe, float(pipe.transformer.config.guidance_scale), 10
    return build_ours(64, seed=0), 4.5, 1000


@torch.inference_mode()
def run(pipe: SphereARPipeline, batch: int, guidance: float, steps: int, num_classes: int) -> torch.Tensor:
    labels = [(7 * i + 1) % num_classes for i in range(batch)]
    return pipe(labels, guidance_scale=guidance, num_inference_steps=steps, output_type="pt",
                generator=image_generators(0, range(batch))).images


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, CPU fp32, {torch.get_num_threads()} threads by default on this machine, "
          f"best of {args.repeats}", flush=True)
    rows = []
    for name in args.models:
        pipe, guidance, num_classes = load(name)
        pipe.set_progress_bar_config(disable=True)
        steps = args.digits_steps if name == "digits" else args.b_steps
        for batch in args.batch_sizes:
            best = {n: float("inf") for n in args.threads}
            images = {}
            for n in args.threads:  # warm-up, and the images to compare
                torch.set_num_threads(n)
                images[n] = run(pipe, batch, guidance, steps, num_classes)
            for _ in range(args.repeats):
                for n in args.threads:
                    torch.set_num_threads(n)
                    t0 = time.perf_counter()
                    run(pipe, batch, guidance, steps, num_classes)
                    best[n] = min(best[n], time.perf_counter() - t0)
            first = images[args.threads[0]]
            diff = max((images[n] - first).abs().max().item() for n in args.threads)
            rates = {n: batch / best[n] for n in args.threads}
            rows.append((name, steps, batch, rates, diff))
            cells = ", ".join(f"{n} thread{'s' * (n > 1)} {r:.2f} images/s" for n, r in rates.items())
            print(f"{name} ({steps} steps) batch {batch}: {cells}; max image difference {diff:.1e}", flush=True)
    print("\n| model | steps | batch | " + " | ".join(f"{n} thread{'s' * (n > 1)}, images/s" for n in args.threads)
          + " | ratio | max image difference |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in args.threads) + " | ---: | ---: |")
    for name, steps, batch, rates, diff in rows:
        ratio = rates[args.threads[-1]] / rates[args.threads[0]]
        print(f"| {name} | {steps} | {batch} | " + " | ".join(f"{r:.2f}" for r in rates.values())
              + f" | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
