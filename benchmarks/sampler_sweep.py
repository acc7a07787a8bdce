"""Quality against head evaluations per token, per sampler, on the embedded digits model.

    python benchmarks/sampler_sweep.py run --points euler_maruyama:100 heun:12 --seeds 0 1 2 --results sweep.jsonl
    python benchmarks/sampler_sweep.py report --results sweep.jsonl --plot docs/sampler_sweep.png

``run``: for each point (``SAMPLER:STEPS`` or ``SAMPLER:STEPS:TIME_SHIFT``) and seed, ``sphere-ar sample`` writes
``--num-images`` images (balanced labels) and ``sphere-ar evaluate --features digits`` (the evaluation API) measures
them against the held-out real digits; one JSON line per (point, seed) is appended to ``--results``, and points
already there are skipped, so several ``run`` processes can share the work and a killed one can be restarted.
``report``: the table (mean and standard deviation over the seeds) as Markdown, and a plot of the Fréchet distance
against head evaluations per token. Numbers are measured, never asserted. (The JSON lines also hold each run's
wall time; the table leaves it out, since runs shared the machine with other work.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf import SphereARScheduler, bundled_model_path  # noqa: E402
from sphere_ar_hf.cli import main as cli  # noqa: E402
from sphere_ar_hf.evaluation import evaluate  # noqa: E402

DEFAULT_POINTS = ["euler_maruyama:100", "euler_maruyama:50", "euler_maruyama:25", "euler_maruyama:10",
                  "euler:10", "euler:25", "euler:50", "heun:5", "heun:8", "heun:12"]


def parse_point(text: str) -> tuple[str, int, float]:
    parts = text.split(":")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 1.0


def cmd_run(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {(r["point"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sampler-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model or bundled_model_path("digits"))
    for point in args.points:
        sampler, steps, shift = parse_point(point)
        for seed in args.seeds:
            if (point, seed) in done:
                continue
            out = work / f"{point.replace(':', '-')}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            rc = cli(["sample", "--model", str(model), "--time-shift", str(shift), "--num-images",
                      str(args.num_images), "--output-dir", str(out), "--labels", "balanced", "--seed", str(seed),
                      "--sampler", sampler, "--steps", str(steps), "--batch-size", str(args.batch_size),
                      "--shard-size", str(args.num_images), "--device", "cpu"])
            if rc:
                raise SystemExit(f"sphere-ar sample failed for {point} seed {seed}")
            seconds = time.perf_counter() - t0
            metrics = evaluate(out / "samples.npz", features="digits")
            evals = len(SphereARScheduler(sampler=sampler, num_inference_steps=steps, time_shift=shift))
            row = {"point": point, "sampler": sampler, "steps": steps, "time_shift": shift, "seed": seed,
                   "head_evaluations": evals, "num_images": args.num_images, "seconds": seconds,
                   **{k: metrics[k] for k in ("frechet_distance", "accuracy", "precision", "recall")}}
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)


def cmd_report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines()]
    points: dict[str, list[dict]] = {}
    for r in rows:
        points.setdefault(r["point"], []).append(r)
    summary = []
    for point, rs in points.items():
        def stat(key, rs=rs):  # mean, standard deviation over the seeds, standard error of the mean
            v = np.array([r[key] for r in rs], dtype=np.float64)
            std = v.std(ddof=1) if len(v) > 1 else float("nan")
            return v.mean(), std, std / np.sqrt(len(v))

        summary.append({"point": point, "sampler": rs[0]["sampler"], "steps": rs[0]["steps"],
                        "time_shift": rs[0]["time_shift"], "evals": rs[0]["head_evaluations"], "seeds": len(rs),
                        "images": rs[0]["num_images"], "fd": stat("frechet_distance"), "acc": stat("accuracy"),
                        "precision": stat("precision"), "recall": stat("recall")})
    summary.sort(key=lambda s: (s["sampler"], s["time_shift"], -s["evals"]))
    if args.min_seeds:
        summary = [s for s in summary if s["seeds"] >= args.min_seeds]
    ref = next((s for s in summary if s["point"] == args.reference), None)
    print("Mean ± standard deviation over the seeds (standard error of the mean in brackets); Δ: the difference "
          f"from {args.reference} in standard errors of the difference (|Δ| < 2: within noise).\n")
    print("| sampler | steps | head evaluations / token | Fréchet distance | Δ FD | accuracy | precision | recall | "
          "Δ recall | seeds x images |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in summary:
        name = s["sampler"] + (f" (time shift {s['time_shift']:g})" if s["time_shift"] != 1.0 else "")
        print(f"| {name} | {s['steps']} | {s['evals']} | {s['fd'][0]:.3f} ± {s['fd'][1]:.3f} ({s['fd'][2]:.3f}) | "
              f"{_delta(s, ref, 'fd')} | {100 * s['acc'][0]:.2f} ± {100 * s['acc'][1]:.2f}% | "
              f"{s['precision'][0]:.3f} | {s['recall'][0]:.3f} ± {s['recall'][1]:.3f} ({s['recall'][2]:.3f}) | "
              f"{_delta(s, ref, 'recall')} | {s['seeds']} x {s['images']} |")
    if ref is not None:
        equal = [s for s in summary if _z(s, ref, "fd") < 2 and _z(s, ref, "recall") > -2]
        best = min(equal, key=lambda s: s["evals"])
        print(f"\nreference {args.reference}: Fréchet distance {ref['fd'][0]:.3f} ± {ref['fd'][1]:.3f} (SE "
              f"{ref['fd'][2]:.3f}), recall {ref['recall'][0]:.3f} ± {ref['recall'][1]:.3f} ({ref['evals']} head "
              "evaluations per token); neither Fréchet distance worse nor recall lower by 2 standard errors: "
              + ", ".join(f"{s['point']} ({s['evals']})" for s in sorted(equal, key=lambda s: s["evals"])))
        print(f"fewest head evaluations at equal quality: {best['point']}, {best['evals']} per token: "
              f"{ref['evals'] / best['evals']:.1f}x fewer than {args.reference}")
    if args.plot:
        plot(summary, Path(args.plot), ref)


def _z(s: dict, ref: dict, key: str) -> float:
    """``s``'s mean minus the reference's, in standard errors of the difference (Welch)."""
    return (s[key][0] - ref[key][0]) / float(np.hypot(s[key][2], ref[key][2]) or np.inf)


def _delta(s: dict, ref: dict | None, key: str) -> str:
    if ref is None or s is ref:
        return "ref."
    return f"{_z(s, ref, key):+.1f}"


def plot(summary: list[dict], path: Path, ref: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    groups: dict[str, list[dict]] = {}
    for s in summary:
        label = s["sampler"] + (f", time shift {s['time_shift']:g}" if s["time_shift"] != 1.0 else "")
        groups.setdefault(label, []).append(s)
    for ax, key, name in ((axes[0], "fd", "Fréchet distance (digits features, lower is better)"),
                          (axes[1], "recall", "recall, k = 3 (diversity, higher is better)")):
        for label, ss in groups.items():
            ss = sorted(ss, key=lambda s: s["evals"])
            ax.errorbar([s["evals"] for s in ss], [s[key][0] for s in ss], yerr=[s[key][1] for s in ss], marker="o",
                        capsize=3, label=label)
        if ref is not None:
            ax.axhspan(ref[key][0] - ref[key][1], ref[key][0] + ref[key][1], color="gray", alpha=0.2,
                       label=f"{ref['point']} ± 1 std")
        ax.set_xscale("log")
        ax.set_xlabel("head evaluations per token")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    seeds = sorted({s["seeds"] for s in summary})
    fig.suptitle(f"Embedded digits model: quality vs sampler cost (mean ± std over {'/'.join(map(str, seeds))} seeds "
                 f"x {summary[0]['images']:,} images)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="SAMPLER:STEPS[:TIME_SHIFT] ...")
    run.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    run.add_argument("--num-images", type=int, default=5000)
    run.add_argument("--batch-size", type=int, default=500)
    run.add_argument("--threads", type=int, default=1, help="torch threads (run one process per core)")
    run.add_argument("--model", default=None, help="pipeline folder (default: the embedded digits model)")
    run.add_argument("--work-dir", default=None, help="where samples are written (and removed after evaluation)")
    run.add_argument("--results", required=True, help="JSON-lines file the results are appended to")
    rep = sub.add_parser("report", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    rep.add_argument("--results", required=True)
    rep.add_argument("--reference", default="euler_maruyama:100", help="the point whose spread defines 'equal'")
    rep.add_argument("--plot", default=None, help="PNG path for the plot (needs matplotlib)")
    rep.add_argument("--min-seeds", type=int, default=0, help="leave out points with fewer seeds")
    args = p.parse_args(argv)
    cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
