"""Does the sphere help where drift can compound? The digits ablation at 4, 16 and 64 tokens per image.

    python benchmarks/ablation_tokens.py --out docs/ablation_tokens          # the full run (resumable)
    python benchmarks/ablation_tokens.py --tokens 64 --train-seeds 0          # a first part (the full run reuses it)
    python benchmarks/ablation_tokens.py --from-json docs/ablation_tokens.json --out /tmp/t   # re-render only

``benchmarks/ablation_digits.py`` at 4 tokens per image leaves error that accumulates token after token under CFG
no room to compound. This runs the same ablation (its jobs, functions and files: one ``ablation_digits`` work folder
per token count, ``<work-dir>/tokens<N>``) at 4, 16 and 64 tokens per image. The token grid is set by the S-VAE's
patch, not by the canvas: the digits stay 16 px (the 8x8 scans upscaled; the classifier that measures them, the
data and every other stage are the same at every token count) and the CNN gets fewer 2x downsampling levels
(``--cnn_channels``: patch 8 -> 2x2 = 4 tokens, patch 4 -> 4x4 = 16, patch 2 -> 8x8 = 64; the ViT width stays
64). A larger canvas would cost 4-16x more convolution for no more information than the 8x8 scans hold.

One recipe at every token count and for every variant (``examples/train_digits.py``: the S-VAE's ViTs, the AR
model of width 128, 4 blocks, head 192 x 3, EMA, 16 latent dims on the radius-4 sphere), shortened to fit the
budget of this 2-core machine: ``--vae-epochs`` 30 and ``--ar-epochs`` 50 (the digits recipe: 50 and 100), and
``--diff_batch_mul`` so that the head sees at least 16 noisy targets per image per step (4 at 4 tokens, as the
recipe; 1 at 16 and 64 tokens, where the head already sees 16 or 64 tokens per image). Every model is trained
from scratch per training seed (S-VAE included).

Each model is measured at ``--guidance-scales`` (1 / 3 / 6) with ``--n-per-class`` x 10 images through
``sampler`` (default: Heun, 5 steps, time shift 0.5: 9 head evaluations per token, within noise of the official
100-step Euler-Maruyama on the 4-token model, docs/samplers.md). The sampler check repeats that comparison at one
point of the new run (``--check-tokens`` 64, ``--check-variants``, ``--check-guidance`` 6, the first training seed):
``--check-seeds`` sampling seeds with each of the run's sampler and the official one (``--check-reference``), the
paired differences' mean and standard error. The same sampling passes record each generated token's norm and
within-class variance per decoding position (``variance_collapse.TokenRecorder``) against the encoded train split
through each seed's S-VAE (raw, or projected as the variant's AR model saw it).

Writes ``<out>.md`` (tables: Fréchet distance and accuracy per token count, variant and guidance, mean ± std over
the training seeds with the standard error; the Gaussian - sphere gap; the S-VAEs; the sampler check),
``<out>.png`` (Fréchet distance against guidance per token count, and the gap against the token count),
``<out>_collapse.png`` / ``.md`` (norm and within-class variance per position at ``--collapse-tokens``) and
``<out>.json`` (every number). Jobs run in ``--jobs`` processes (an estimate first, then a progress bar in
estimated seconds); each writes its result atomically and a rerun skips it. ``--variants`` adds the two
normalised-Gaussian variants if the budget allows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "src", ROOT / "examples", ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import ablation_digits as ablation  # noqa: E402
from ablation_report import plot_fd, sampler_text  # noqa: E402

TOKENS = (4, 16, 64)
# per token count: the S-VAE's CNN stages (patch 2^(stages - 1) on the 16 px digits) and the head's noisy targets
# per token (at least 16 per image); everything else is the recipe's, the same at every token count
CNN_CHANNELS = {4: [16, 32, 64, 64], 16: [16, 32, 64], 64: [16, 64]}
DIFF_BATCH_MUL = {4: 4, 16: 1, 64: 1}
# the cost model of the progress bar and of the estimate printed before the run: seconds per S-VAE epoch, per AR
# epoch, and per generated image under guidance with 9 head evaluations per token (Heun, 5 steps), one thread per
# job and two jobs on the 2 cores (measured 2026-12-05 on short slices of these sizes; the recipe's widths)
SECONDS = {4: {"vae_epoch": 3.5, "ar_epoch": 5.5, "image": 0.004},
           16: {"vae_epoch": 2.5, "ar_epoch": 5.0, "image": 0.0075},
           64: {"vae_epoch": 5.8, "ar_epoch": 15.0, "image": 0.031}}
JOB_SECONDS = 8.0  # a job's own start: a fresh process, imports, the digit classifier, loading the models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ablation.output_arguments(p, "ablation_tokens", "one ablation_digits work folder per token count, "
                              "<work-dir>/tokens<N>", "<out>.md, <out>.png, <out>.json and <out>_collapse.{md,png}")
    p.add_argument("--tokens", type=int, nargs="+", choices=TOKENS, default=list(TOKENS),
                   help="tokens per image (2x2, 4x4, 8x8)")
    p.add_argument("--variants", nargs="+", choices=list(ablation.VARIANTS), default=["gaussian", "sphere"])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    p.add_argument("--n-per-class", type=int, default=100, help="generated images per class, model and guidance")
    p.add_argument("--sampler", choices=["euler_maruyama", "euler", "heun"], default="heun")
    p.add_argument("--steps", type=int, default=5, help="sampler steps per token")
    p.add_argument("--time-shift", type=float, default=0.5)
    p.add_argument("--vae-epochs", type=int, default=30)
    p.add_argument("--ar-epochs", type=float, default=50)
    p.add_argument("--recipe-args", default="",
                   help="extra flags for every examples/train_digits.py stage at every token count (after the sizes "
                        "above, so they win), e.g. '--hidden_size 64'")
    g = p.add_argument_group("the sampler check (one point; --check-seeds 0: none)")
    g.add_argument("--check-tokens", type=int, choices=TOKENS, default=64)
    g.add_argument("--check-variants", nargs="+", choices=list(ablation.VARIANTS), default=["gaussian", "sphere"])
    g.add_argument("--check-guidance", type=float, default=6.0)
    g.add_argument("--check-seeds", type=int, default=8, help="sampling seeds 0..N-1 (their model: the first "
                                                              "training seed's)")
    g.add_argument("--check-n-per-class", type=int, default=50)
    g.add_argument("--check-reference", default="euler_maruyama:100:1",
                   help="SAMPLER:STEPS:TIME_SHIFT compared with the run's sampler")
    p.add_argument("--collapse-tokens", type=int, choices=TOKENS, default=None,
                   help="the token count of the variance-collapse plot (default: the largest of --tokens)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel (1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    args = p.parse_args(argv)
    args.tokens = sorted(set(args.tokens))
    if args.collapse_tokens is None:
        args.collapse_tokens = max(args.tokens)
    if args.collapse_tokens not in args.tokens:
        p.error(f"--collapse-tokens {args.collapse_tokens}: not among --tokens {args.tokens}")
    if args.check_seeds and args.check_tokens not in args.tokens:
        p.error(f"--check-tokens {args.check_tokens}: not among --tokens {args.tokens} (or --check-seeds 0)")
    if args.check_seeds and not set(args.check_variants) <= set(args.variants):
        p.error(f"--check-variants {args.check_variants}: not all among --variants {args.variants}")
    return args


def recipe_args(args: argparse.Namespace, tokens: int) -> str:
    """The examples/train_digits.py flags of a token count."""
    return " ".join(["--cnn_channels", *map(str, CNN_CHANNELS[tokens]), "--diff_batch_mul",
                     str(DIFF_BATCH_MUL[tokens]), "--vae_epochs", str(args.vae_epochs), "--ar_epochs",
                     f"{args.ar_epochs:g}", args.recipe_args]).strip()


def ablation_args(args: argparse.Namespace, tokens: int) -> argparse.Namespace:
    """The ``ablation_digits`` settings of one token count."""
    return ablation.parse_args([
        "--work-dir", str(args.work_dir / f"tokens{tokens}"), "--variants", *args.variants,
        "--train-seeds", *map(str, args.train_seeds), "--guidance-scales", *map(str, args.guidance_scales),
        "--n-per-class", str(args.n_per_class), "--steps", str(args.steps), "--sampler", args.sampler,
        "--time-shift", str(args.time_shift), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--recipe-args", recipe_args(args, tokens)])


def check_points(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """The two samplers of the check: the run's, then the reference."""
    sampler, steps, shift = args.check_reference.split(":") + ["1"] * (3 - len(args.check_reference.split(":")))
    return [(args.sampler, args.steps, args.time_shift), (sampler, int(steps), float(shift))]


def job_cost(job: ablation.Job, tokens: int, args: argparse.Namespace) -> float:
    """The estimated seconds of a job (:data:`SECONDS`); an image costs (5 + head evaluations per token) / 14
    times a Heun-5 image (measured: 100-step Euler-Maruyama 7.5x Heun-5 at 64 tokens), about half without
    guidance."""
    from sphere_ar_hf import SphereARScheduler

    c = SECONDS[tokens]
    if job.fn is ablation.vae_job:
        return JOB_SECONDS + args.vae_epochs * c["vae_epoch"]
    if job.fn is ablation.ar_job:
        return JOB_SECONDS + args.ar_epochs * c["ar_epoch"]
    if job.fn is ablation.eval_job:
        scales, n_per_class, steps, sampler, shift = (job.args[i] for i in (3, 4, 5, 8, 9))
        evals = len(SphereARScheduler(sampler=sampler, num_inference_steps=steps, time_shift=shift))
        image = c["image"] * (5 + evals) / 14
        return JOB_SECONDS + sum(10 * n_per_class * image * (1.0 if g > 1 else 0.55) for g in scales)
    return JOB_SECONDS


def plan(args: argparse.Namespace) -> list[ablation.Job]:
    """Every job, the longest token count first (its trainings are the longest jobs); the sampler check right
    after its model's jobs, so that its answer comes early."""
    jobs = []
    for tokens in sorted(args.tokens, reverse=True):
        sub = ablation_args(args, tokens)
        ablation.prepare_data(sub.work_dir)
        mine = [replace(j, name=f"{tokens}t {j.name}", after=tuple(f"{tokens}t {a}" for a in j.after),
                        cost=job_cost(j, tokens, args)) for j in ablation.plan(sub)]
        if args.check_seeds and tokens == args.check_tokens:
            s = args.train_seeds[0]
            checks = [replace(job, cost=job_cost(job, tokens, args)) for job in (
                      ablation.Job(f"{tokens}t check {v} {sampler}{steps} sample seed {k}",
                                   ablation.eval_path(sub.work_dir, v, s, steps, args.check_n_per_class, sampler,
                                                      shift, k),
                                   ablation.eval_job, (str(sub.work_dir), v, s, [args.check_guidance],
                                                       args.check_n_per_class, steps, args.batch_size, args.threads,
                                                       sampler, shift, k),
                                   (f"{tokens}t ar {v} seed {s}",), (args.check_guidance,))
                      for k in range(args.check_seeds) for v in args.check_variants
                      for sampler, steps, shift in check_points(args))]
            last = max(i for i, j in enumerate(mine) if j.name.endswith(f"seed {s}"))
            mine[last + 1:last + 1] = checks
        jobs += mine
    return jobs


# ---- the summary ------------------------------------------------------------------------------------------------


def _mean_sd_se(x: list[float]) -> dict:
    a = np.asarray(x, dtype=float)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": sd, "se": sd / np.sqrt(len(a)), "values": a.tolist()}


def check_summary(args: argparse.Namespace) -> dict:
    """Per checked variant: each sampler's Fréchet distance and accuracy over the sampling seeds, and the paired
    difference (run's sampler - reference; same model, labels and seeds)."""
    sub = ablation_args(args, args.check_tokens)
    points = check_points(args)
    out = {"tokens": args.check_tokens, "guidance_scale": args.check_guidance, "train_seed": args.train_seeds[0],
           "num_images": 10 * args.check_n_per_class, "sampling_seeds": list(range(args.check_seeds)),
           "samplers": [f"{s}:{n}:{t:g}" for s, n, t in points], "variants": {}}
    for v in args.check_variants:
        per = []
        for sampler, steps, shift in points:
            rows = [next(r for r in json.loads(ablation.eval_path(sub.work_dir, v, args.train_seeds[0], steps,
                                                                  args.check_n_per_class, sampler, shift, k)
                                               .read_text())["rows"] if r["guidance_scale"] == args.check_guidance)
                    for k in range(args.check_seeds)]
            per.append({"fd": _mean_sd_se([r["frechet_distance"] for r in rows]),
                        "accuracy": _mean_sd_se([r["accuracy"] for r in rows]),
                        "seconds": float(sum(r["seconds"] for r in rows))})
        diff = _mean_sd_se(np.subtract(per[0]["fd"]["values"], per[1]["fd"]["values"]).tolist())
        diff["z"] = diff["mean"] / diff["se"] if diff["se"] > 0 else float("nan")
        # undecided (None) with one sampling seed: no spread to measure the difference against
        diff["within_noise"] = bool(abs(diff["mean"]) <= 2 * diff["se"]) if args.check_seeds > 1 else None
        out["variants"][v] = {"label": ablation.VARIANTS[v].label, "run": per[0], "reference": per[1],
                              "fd_difference": diff}
    return out


def collapse_results(args: argparse.Namespace, tokens: int) -> dict:
    """``variance_collapse``'s results at one token count from the evaluations' recorded statistics: per variant
    and guidance the mean over the training seeds (and min-max), and the encoded real tokens (mean over the seeds'
    S-VAEs, raw or projected as the variant's AR model saw them)."""
    sub = ablation_args(args, tokens)
    keys = ("norm_mean", "norm_std", "within_class_var")
    out = {"settings": {"tokens": tokens, "n_per_class": args.n_per_class, "steps": args.steps,
                        "sampler": args.sampler, "time_shift": args.time_shift, "train_seeds": args.train_seeds},
           "radius": None, "variants": {}}

    def mean(stats: list[dict]) -> dict:
        return {k: np.mean([s[k] for s in stats], axis=0).tolist() for k in keys}

    for v in args.variants:
        spec = ablation.VARIANTS[v]
        real, generated = [], {f"{g:g}": [] for g in args.guidance_scales}
        for s in args.train_seeds:
            d = sub.work_dir / f"seed{s}"
            real.append(json.loads((d / f"vae-{spec.vae}" / "real-tokens.json").read_text())
                        ["projected" if spec.normalize_tokens else "raw"])
            rows = {r["guidance_scale"]: r for r in json.loads(ablation.eval_path(
                sub.work_dir, v, s, args.steps, args.n_per_class, args.sampler, args.time_shift).read_text())["rows"]}
            for g in args.guidance_scales:
                generated[f"{g:g}"].append(rows[g]["tokens"])
        out["variants"][v] = {
            "label": spec.label, "normalize_tokens": spec.normalize_tokens, "posterior": "power_spherical"
            if spec.vae == "power_spherical" else "gaussian", "real": mean(real),
            "generated": {g: mean(st) for g, st in generated.items()},
            "generated_range": {g: {k: [np.min([s[k] for s in st], axis=0).tolist(),
                                        np.max([s[k] for s in st], axis=0).tolist()] for k in keys}
                                for g, st in generated.items()},
            "per_seed": {"real": real, "generated": generated}}
    pipeline = json.loads((sub.work_dir / f"seed{args.train_seeds[0]}" / args.variants[0] / "done.json").read_text())
    out["radius"] = float(np.sqrt(json.loads((Path(pipeline["pipeline"]) / "vae" / "config.json").read_text())
                                  ["latent_dim"]))
    return out


def gaps(summary: dict) -> dict:
    """Gaussian - sphere Fréchet distance per token count and guidance, with the standard error of the
    difference of the two means (independent seeds)."""
    out = {}
    for tokens, s in summary["tokens"].items():
        if not {"gaussian", "sphere"} <= set(s["variants"]):
            continue
        out[tokens] = []
        for rg, rs in zip(s["variants"]["gaussian"]["rows"], s["variants"]["sphere"]["rows"]):
            se = float(np.hypot(rg["fd_sem"], rs["fd_sem"]))
            diff = rg["fd_mean"] - rs["fd_mean"]
            out[tokens].append({"guidance_scale": rg["guidance_scale"], "difference": diff, "se": se,
                                "z": diff / se if se > 0 else float("nan"),
                                "ratio": rg["fd_mean"] / rs["fd_mean"]})
    return out


def summarize(args: argparse.Namespace, seconds: float) -> dict:
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "recipe": {str(t): recipe_args(args, t) for t in args.tokens},
               "tokens": {str(t): ablation.summarize(ablation_args(args, t)) for t in args.tokens},
               "wall_seconds_this_run": seconds}
    summary["gaps"] = gaps(summary)
    summary["check"] = check_summary(args) if args.check_seeds else None
    summary["collapse"] = {str(t): collapse_results(args, t) for t in args.tokens}
    return summary


# ---- the outputs ------------------------------------------------------------------------------------------------


def _cell(r: dict) -> str:
    return f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f} (SE {r['fd_sem']:.2f})"


def write_table(summary: dict, path: Path) -> str:
    s = summary["settings"]
    scales = s["guidance_scales"]
    seeds = len(s["train_seeds"])
    any_tokens = next(iter(summary["tokens"].values()))
    head = "| tokens | variant | " + " | ".join(f"w = {g:g}" for g in scales) + " |"
    rule = "| ---: | --- | " + " | ".join("---:" for _ in scales) + " |"
    lines = [f"Fréchet distance in the digit classifier's feature space (lower is better): mean ± standard deviation "
             f"over {seeds} training seed{'s' if seeds != 1 else ''} (each a model trained from scratch, S-VAE "
             f"included, sampled with its own seed), then the standard error of the mean; "
             f"{10 * s['n_per_class']} images per cell, {sampler_text(s)}, linear CFG schedule. Real train "
             f"subset vs real test, same n: {any_tokens['baseline']['same_n_vs_test']:.2f}. Recipe per token count: "
             + "; ".join(f"{t}: `{r}`" for t, r in summary["recipe"].items()) + ".", "", head, rule]
    for tokens, data in summary["tokens"].items():
        for v in data["variants"].values():
            lines.append(f"| {tokens} | {v['label']} | " + " | ".join(map(_cell, v["rows"])) + " |")
    lines += ["", "Classifier accuracy on the generated digits (the requested class), mean over seeds (min):", "",
              head, rule]
    for tokens, data in summary["tokens"].items():
        for v in data["variants"].values():
            lines.append(f"| {tokens} | {v['label']} | " + " | ".join(
                f"{100 * r['accuracy_mean']:.1f}% ({100 * r['accuracy_min']:.1f}%)" for r in v["rows"]) + " |")
    if summary["gaps"]:
        lines += ["", "The gap: Gaussian - S-VAE Fréchet distance (difference of the means ± its standard error, "
                  "then in standard errors; the ratio of the means):", "",
                  "| tokens | " + " | ".join(f"w = {g:g}" for g in scales) + " |",
                  "| ---: | " + " | ".join("---:" for _ in scales) + " |"]
        for tokens, rows in summary["gaps"].items():
            lines.append(f"| {tokens} | " + " | ".join(
                f"{r['difference']:+.2f} ± {r['se']:.2f} ({r['z']:+.1f} SE; x{r['ratio']:.2f})" for r in rows) + " |")
    lines += ["", "The S-VAEs (mean over seeds): test L1 in [-1, 1] (posterior mode), KL per token, the norm of the "
              "raw draws, and the floor: the Fréchet distance of reconstructed train digits (mean ± std).", "",
              "| tokens | S-VAE | test L1 | KL / token | draw norm | reconstruction FD |",
              "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for tokens, data in summary["tokens"].items():
        for k, vae in data["vaes"].items():
            fd = _mean_sd_se(vae["reconstruction_fd"])
            lines.append(f"| {tokens} | {k} | {vae['test_l1_mode']:.3f} | {vae['kl_per_token']:.1f} | "
                         f"{vae['token_norm_mean']:.2f} ± {vae['token_norm_std']:.2f} | {fd['mean']:.2f} ± "
                         f"{fd['std']:.2f} |")
    check = summary.get("check")
    if check:
        run, ref = check["samplers"]
        lines += ["", f"The sampler check: {check['tokens']} tokens, w = {check['guidance_scale']:g}, the model of "
                  f"training seed {check['train_seed']}, {len(check['sampling_seeds'])} sampling seeds x "
                  f"{check['num_images']} images; `{run}` (this run) against `{ref}`. Mean ± std over the sampling "
                  "seeds (SE); the paired difference (same labels and seeds) is within noise when at most 2 of its "
                  "standard errors.", "",
                  f"| variant | FD, {run} | FD, {ref} | difference (SE) | | accuracy, {run} / {ref} | seconds |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for v in check["variants"].values():
            a, b, d = v["run"], v["reference"], v["fd_difference"]
            lines.append(f"| {v['label']} | {a['fd']['mean']:.3f} ± {a['fd']['std']:.3f} ({a['fd']['se']:.3f}) | "
                         f"{b['fd']['mean']:.3f} ± {b['fd']['std']:.3f} ({b['fd']['se']:.3f}) | "
                         f"{d['mean']:+.3f} ({d['se']:.3f}; {d['z']:+.1f} SE) | "
                         f"{ {True: 'within noise', False: 'differs', None: 'n/a (1 seed)'}[d['within_noise']]} | "
                         f"{100 * a['accuracy']['mean']:.1f}% / {100 * b['accuracy']['mean']:.1f}% | "
                         f"{a['seconds']:.0f} / {b['seconds']:.0f} |")
    lines += ["", "Job time (sum over the jobs; the wall time is about half with 2 jobs): " + "; ".join(
        f"{t} tokens: training {d['train_seconds']:.0f} s, evaluation {d['eval_seconds']:.0f} s"
        for t, d in summary["tokens"].items()) + "."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary["tokens"].items())
    extra = 1 if summary["gaps"] else 0
    fig, axes = plt.subplots(1, len(panels) + extra, figsize=(4.2 * (len(panels) + extra), 4.0), dpi=120,
                             squeeze=False)
    for i, (tokens, data) in enumerate(panels):
        plot_fd(axes[0, i], data, f"{tokens} tokens per image", legend=i == 0)
    if extra:
        ax = axes[0, -1]
        counts = [int(t) for t in summary["gaps"]]
        for j, g in enumerate(summary["settings"]["guidance_scales"]):
            d = np.array([rows[j]["difference"] for rows in summary["gaps"].values()])
            se = np.array([rows[j]["se"] for rows in summary["gaps"].values()])
            ax.errorbar(counts, d, yerr=2 * se, marker="o", capsize=3, label=f"w = {g:g}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set(xlabel="tokens per image", ylabel="FD(Gaussian) - FD(S-VAE)")
        ax.set_title("the gap (± 2 SE)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len(summary["settings"]["train_seeds"])
    fig.suptitle(f"Digits: Gaussian vs hyperspherical latents by tokens per image ({seeds} training "
                 f"seed{'s' if seeds != 1 else ''}; mean, min-max shaded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(summary: dict, out: Path) -> str:
    import variance_collapse

    out.parent.mkdir(parents=True, exist_ok=True)
    text = write_table(summary, out.with_suffix(".md"))
    write_plot(summary, out.with_suffix(".png"))
    collapse = summary["collapse"][str(summary["settings"]["collapse_tokens"])]
    stem = out.with_name(out.name + "_collapse")
    text += "\n" + variance_collapse.write_table(collapse, stem.with_suffix(".md"))
    variance_collapse.write_plot(collapse, stem.with_suffix(".png"))
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = args.out if args.out is not None else args.work_dir / "report"
    if args.from_json is not None:
        summary = json.loads(args.from_json.read_text())
        print(write_outputs(summary, out))
        print(f"wrote {out}.md, .png and {out.name}_collapse.md / .png from {args.from_json}")
        return summary
    t0 = time.perf_counter()
    jobs = plan(args)
    left = [j for j in jobs if not j.finished()]
    if left:
        total, parallel = sum(j.cost for j in left), max(1, min(args.jobs, 2))
        print(f"{len(left)} of {len(jobs)} jobs to run: about {total / 3600:.1f} h of job time, "
              f"{total / 3600 / parallel:.1f} h with --jobs {args.jobs} on 2 quiet cores (estimated for the recipe's "
              "widths; the bar counts it in seconds)", flush=True)
    seconds = ablation.run_jobs(jobs, args.jobs)
    summary = summarize(args, seconds)
    print(write_outputs(summary, out))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}.md, .png, .json and {out.name}_collapse.md / .png; {time.perf_counter() - t0:.0f} s this run")
    return summary


if __name__ == "__main__":
    main()
