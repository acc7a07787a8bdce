"""Quality while it trains, on the digits recipe: the S-VAE's reconstruction FD and SphereAR's sample FD per step.

    python benchmarks/digits_training_curve.py --run                      # train (about 12 min, 1 thread), then plot
    python benchmarks/digits_training_curve.py --work_dir runs/curve      # plot the curves of an earlier run

``--run`` trains the digits recipe (``examples/train_digits.py``, its defaults) with ``--eval_images 500
--vae_eval_steps 55 --ar_eval_steps 110`` into ``--work_dir``: 20 evaluations per stage, written by the trainers
themselves to ``<work_dir>/vae-run/eval/metrics.jsonl`` and ``<work_dir>/ar-run/eval/metrics.jsonl``. The plot
(``--output``, default docs/training_curve_digits.png) and a JSON copy of both curves (next to it) are then made
from those files. The metric is the digits feature space's Fréchet distance (``sphere-ar evaluate --features
digits``): reconstructions against their originals, samples (100 steps, the recommended guidance, EMA weights,
labels balanced) against the held-out real digits. At 500 images the FD is biased upwards against the 5,000-image
figures of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "examples"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from sphere_ar_hf.training.evaluation_log import EvaluationLog  # noqa: E402
from sphere_ar_hf.utils import atomic_write  # noqa: E402

STAGES = {"vae-run": "S-VAE: reconstruction FD", "ar-run": "SphereAR: sample FD (EMA weights)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", type=Path, default=Path("runs/digits-curve"), help="the recipe's work folder")
    p.add_argument("--run", action="store_true", help="train the recipe with evaluations first")
    p.add_argument("--eval_images", type=int, default=500)
    p.add_argument("--output", type=Path, default=ROOT / "docs" / "training_curve_digits.png")
    return p.parse_args(argv)


def curves(work_dir: Path) -> dict[str, list[dict]]:
    """Each stage's records (step, Fréchet distance, accuracy where sampled, seconds)."""
    out = {}
    for stage in STAGES:
        records = EvaluationLog(work_dir / stage / "eval").records()
        if not records:
            raise SystemExit(f"{work_dir / stage / 'eval' / 'metrics.jsonl'}: no evaluations (train with --run)")
        out[stage] = [{k: r[k] for k in ("step", "epoch", "frechet_distance", "accuracy", "seconds") if k in r}
                      for r in records]
    return out


def plot(data: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (stage, title) in zip(axes, STAGES.items()):
        steps = [r["step"] for r in data[stage]]
        ax.plot(steps, [r["frechet_distance"] for r in data[stage]], "o-", ms=3, color="tab:blue")
        ax.set(title=title, xlabel="optimizer step", ylabel="Fréchet distance (digits features)", yscale="log")
        ax.grid(alpha=0.3)
        if "accuracy" in data[stage][0]:
            twin = ax.twinx()
            twin.plot(steps, [100 * r["accuracy"] for r in data[stage]], "s--", ms=3, color="tab:orange")
            twin.set_ylabel("class accuracy of the samples (%)", color="tab:orange")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.run:
        import train_digits

        train_digits.main(["--output_dir", str(args.work_dir / "pipeline"), "--overwrite", "--work_dir",
                           str(args.work_dir / "work"), "--eval_images", str(args.eval_images),
                           "--vae_eval_steps", "55", "--ar_eval_steps", "110"])
        args.work_dir = args.work_dir / "work"
    data = curves(args.work_dir)
    plot(data, args.output)
    with atomic_write(args.output.with_suffix(".json"), "w") as f:
        json.dump(data, f, indent=1)
    for stage, records in data.items():
        first, last = records[0], records[-1]
        seconds = sum(r["seconds"] for r in records)
        print(f"{STAGES[stage]}: step {first['step']} {first['frechet_distance']:.3f} -> step {last['step']} "
              f"{last['frechet_distance']:.3f} ({len(records)} evaluations, {seconds:.0f} s in all)")
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
