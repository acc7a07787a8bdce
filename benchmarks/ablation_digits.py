"""Does the sphere help? The paper's ablation (Gaussian vs hyperspherical latents) at digits scale, on one CPU.

    python benchmarks/ablation_digits.py --out docs/ablation_digits    # the committed run: docs/ablation_digits.*
    python benchmarks/ablation_digits.py --work-dir /tmp/abl           # resumable: a rerun skips every finished job
    python benchmarks/ablation_digits.py --from-json docs/ablation_digits.json --out /tmp/t  # re-render only

Four variants, each trained with the embedded digits recipe (``examples/train_digits.py``: the same data, sizes,
steps and seeds; only the options below differ), through the project's own trainers:

| variant | S-VAE posterior | decoder input | AR tokens (training and sampling) |
| --- | --- | --- | --- |
| ``gaussian`` | diagonal Gaussian, KL to N(0, I) | raw | raw Gaussian draws, no projection |
| ``gaussian_dec_norm`` | diagonal Gaussian | projected onto the sphere | raw, no projection |
| ``gaussian_ar_norm`` | diagonal Gaussian (the VAE of the row above) | projected | projected onto the sphere |
| ``sphere`` (SphereAR) | Power Spherical | on the sphere | projected onto the sphere |

(``SphereVAE(posterior=..., normalize_decoder_input=...)``, ``SphereARConfig(normalize_tokens=...)``.) Three S-VAEs per
training seed; ``gaussian_ar_norm`` reuses the VAE of ``gaussian_dec_norm``. Each pipeline is measured as
``sphere-ar sample --labels balanced --seed S`` + ``sphere-ar evaluate --features digits`` measure it (the same library
functions): the Fréchet distance of the digit classifier's features to the held-out real test split, and the
classifier's accuracy, at guidance 1 / 2 / 3 / 4.5 / 6 / 8 and 100 steps (``--sampler`` / ``--time-shift`` /
``--steps``: another sampler of the scheduler). Spreads are over ``--train-seeds`` (independent training runs:
different initialisation, data order and noise; the sampling seed is the training seed). The same sampling pass
records, per decoding position, the generated tokens' norm and within-class variance
(``variance_collapse.token_statistics``: each evaluation row's ``tokens``), and every S-VAE's encoded train split
gives the real tokens' (``real-tokens.json``): ``benchmarks/ablation_tokens.py`` plots them.

Jobs run in ``--jobs`` processes of ``--threads`` torch threads each; every job writes its result atomically and a
rerun skips it, so an interrupted run resumes. A model's evaluation file holds one row per guidance scale, named by
its scale: a rerun with other ``--guidance-scales`` samples only the scales it lacks, and the summary reads each scale
by its value. Writes ``<out>.md`` (table), ``<out>.png`` (Fréchet distance against guidance per variant, mean and
min-max over seeds) and ``<out>.json`` (every number); ``--out`` defaults to the work folder, so that a run on a
subset never overwrites the committed ``docs/ablation_digits.*``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "src", ROOT / "examples", ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from ablation_report import (  # noqa: E402
    GUIDANCE_SCALES,
    VAES,
    VARIANTS,
    write_plot,
    write_table,
)


def output_arguments(p: argparse.ArgumentParser, name: str, work_help: str, writes: str) -> None:
    """``--work-dir`` (default ``runs/<name>``), ``--out`` (default ``<work-dir>/report``; the committed run:
    ``docs/<name>``) and ``--from-json`` of an ablation benchmark."""
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / name, help=work_help + " (kept: a rerun resumes)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"writes {writes} (default: <work-dir>/report; the committed run is docs/{name})")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the outputs from a summary JSON this script wrote; trains nothing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    output_arguments(p, "ablation_digits", "runs, pipelines and per-job results",
                     "<out>.md, <out>.png and <out>.json")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance-scales", type=float, nargs="+", default=list(GUIDANCE_SCALES))
    p.add_argument("--n-per-class", type=int, default=100, help="generated images per class and guidance scale")
    p.add_argument("--steps", type=int, default=100, help="sampling steps per token")
    p.add_argument("--sampler", choices=["euler_maruyama", "euler", "heun"], default="euler_maruyama",
                   help="the scheduler's per-token sampler (the official default: euler_maruyama)")
    p.add_argument("--time-shift", type=float, default=1.0, help="the scheduler's time shift (heun: 0.5)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--jobs", type=int, default=2, help="jobs in parallel (1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--recipe-args", default="",
                   help="extra flags for every examples/train_digits.py stage, e.g. '--ar_epochs 10' (a smaller run)")
    return p.parse_args(argv)


# ---- jobs: each a plain function of plain arguments, run in a worker process ------------------------------------


def _recipe(seed: int, flags: list[str], recipe_args: str):
    import train_digits

    return train_digits, train_digits.parse_args(["--output_dir", "unused", "--seed", str(seed), "--ar_workers", "0",
                                                  *flags, *shlex.split(recipe_args)])


def _finish(done: Path, record: dict) -> dict:
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, done)
    return record


@functools.cache
def digit_features(size: int):
    """The digits feature space at ``size`` px (its classifier fitted once per process: jobs run in this process
    with ``--jobs 1`` share it; it is seeded, so every fit is the same)."""
    from sphere_ar_hf.evaluation.digits import DigitFeatures

    return DigitFeatures(size)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def vae_job(work: str, kind: str, seed: int, recipe_args: str, threads: int) -> dict:
    """Train one S-VAE with the recipe and write its latent cache."""
    _threads(threads)
    from sphere_ar_hf.training.latent_cache import cache_latents, load_vae

    t0 = time.perf_counter()
    train_digits, args = _recipe(seed, VAES[kind], recipe_args)
    run = Path(work) / f"seed{seed}" / f"vae-{kind}"
    shutil.rmtree(run, ignore_errors=True)
    num_train = int(json.loads((Path(work) / "data.json").read_text())["num_train"])
    vae_dir = train_digits.train_vae_stage(args, Path(work) / "data", run / "run", num_train)
    vae = load_vae(vae_dir).eval()
    cache_latents(vae, train_digits._data_args(args, Path(work) / "data"), run / "latents", batch_size=256,
                  disable_tqdm=True)
    return _finish(run / "done.json", {"vae": str(vae_dir), "latents": str(run / "latents"),
                                       "seconds": time.perf_counter() - t0, **vae_quality(vae)})


def vae_quality(vae) -> dict:
    """Reconstruction L1 of the held-out test digits (through the posterior mode and one draw), the mean KL per
    token, and the norm of the AR tokens without projection (the Gaussian draws; radius sqrt(d) for the sphere)."""
    import torch

    from sphere_ar_hf.evaluation.digits import load_digit_splits, upscale_digits

    x = torch.from_numpy(upscale_digits(load_digit_splits().test_images, vae.config.image_size))[:, None]
    x = x.repeat(1, vae.config.in_channels, 1, 1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.sample(torch.Generator().manual_seed(0))
        norms = vae.tokens(z, normalize=False).norm(dim=-1)
        return {"test_l1_mode": (vae.decode(dist.mode()).sample - x).abs().mean().item(),
                "test_l1_sample": (vae.decode(z).sample - x).abs().mean().item(),
                "kl_per_token": dist.kl().mean().item(),
                "token_norm_mean": norms.mean().item(), "token_norm_std": norms.std().item()}


def ar_job(work: str, variant: str, seed: int, recipe_args: str, threads: int) -> dict:
    """Train one AR model with the recipe on its S-VAE's latent cache."""
    _threads(threads)
    t0 = time.perf_counter()
    v = VARIANTS[variant]
    flags = VAES[v.vae] + ["--normalize_tokens" if v.normalize_tokens else "--no-normalize_tokens"]
    train_digits, args = _recipe(seed, flags, recipe_args)
    vae_run = Path(work) / f"seed{seed}" / f"vae-{v.vae}"
    vae_info = json.loads((vae_run / "done.json").read_text())
    run = Path(work) / f"seed{seed}" / variant
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    num_train = int(json.loads((Path(work) / "data.json").read_text())["num_train"])
    pipeline = train_digits.train_ar_stage(args, Path(vae_info["vae"]), Path(vae_info["latents"]), run / "ar-run",
                                           num_train)
    return _finish(run / "done.json", {"pipeline": str(pipeline), "seconds": time.perf_counter() - t0})


def eval_path(work: str | Path, variant: str, seed: int, steps: int, n_per_class: int,
              sampler: str = "euler_maruyama", time_shift: float = 1.0, sample_seed: int | None = None) -> Path:
    """The evaluation file of one pipeline: ``eval-{steps}steps-{n}.json`` for the official sampler (as before),
    the sampler and time shift in the name for another, ``-sample{k}`` for a sampling seed other than the
    training seed."""
    name = f"eval-{steps}steps-{n_per_class}" if (sampler, time_shift) == ("euler_maruyama", 1.0) else \
        f"eval-{sampler}{steps}-shift{time_shift:g}-{n_per_class}"
    return Path(work) / f"seed{seed}" / variant / (name + ("" if sample_seed is None else f"-sample{sample_seed}")
                                                   + ".json")


def eval_job(work: str, variant: str, seed: int, guidance_scales: list[float], n_per_class: int, steps: int,
             batch_size: int, threads: int, sampler: str = "euler_maruyama", time_shift: float = 1.0,
             sample_seed: int | None = None) -> dict:
    """Sample and measure one pipeline at every guidance scale (``sphere-ar sample`` + ``evaluate``'s functions),
    with the sampling seed ``sample_seed`` (default: the training seed); each row also holds the generated tokens'
    statistics per decoding position, recorded during the same sampling pass."""
    _threads(threads)
    from variance_collapse import TokenRecorder, token_statistics

    from sphere_ar_hf import SphereARPipeline
    from sphere_ar_hf.evaluation import ImageSet, evaluate_digits, image_labels, image_seeds, sample_images
    from sphere_ar_hf.evaluation.sampling import set_sampler

    out = eval_path(work, variant, seed, steps, n_per_class, sampler, time_shift, sample_seed)
    have = {r["guidance_scale"]: r for r in (json.loads(out.read_text())["rows"] if out.is_file() else [])}
    pipeline = json.loads((Path(work) / f"seed{seed}" / variant / "done.json").read_text())["pipeline"]
    pipe = SphereARPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    set_sampler(pipe, sampler, time_shift)
    extractor = digit_features(pipe.vae.config.image_size)
    indices = np.arange(10 * n_per_class)
    labels = image_labels(seed, indices, pipe.transformer.config.num_classes, "balanced")
    seeds = image_seeds(seed if sample_seed is None else sample_seed, indices)
    for g in (g for g in guidance_scales if g not in have):
        t = time.perf_counter()
        recorder = TokenRecorder(len(labels), batch_size, pipe.transformer.config.num_image_tokens, g)
        images = sample_images(pipe, labels, seeds, batch_size, guidance_scale=g, num_inference_steps=steps,
                               callback_on_step_end=recorder)
        m = evaluate_digits(ImageSet.from_arrays(images, labels), extractor=extractor, with_precision_recall=False)
        have[g] = {"guidance_scale": g, "frechet_distance": m["frechet_distance"], "accuracy": m["accuracy"],
                   "num_images": len(images), "seconds": time.perf_counter() - t,
                   "tokens": token_statistics(recorder.tokens(), labels)}
    rows = [have[g] for g in sorted(have)]
    return _finish(out, {"variant": variant, "seed": seed, "sample_seed": seed if sample_seed is None else sample_seed,
                         "sampler": sampler, "time_shift": time_shift, "steps": steps, "rows": rows,
                         "seconds": sum(r["seconds"] for r in rows)})


def eval_scales(path: Path) -> set[float]:
    """The guidance scales an evaluation file holds (none if it does not exist)."""
    return {r["guidance_scale"] for r in json.loads(path.read_text())["rows"]} if path.is_file() else set()


def reconstruction_job(work: str, kind: str, seed: int, n: int, threads: int) -> dict:
    """The S-VAE's floor: the Fréchet distance of its reconstructions of ``n`` real train digits (through one
    posterior draw, stored as uint8 like generated images) to the held-out test split, next to the real train
    digits' own (``baseline``). No AR model can sample better than its decoder reconstructs."""
    _threads(threads)
    import torch

    from sphere_ar_hf.evaluation import ImageSet, evaluate_digits, to_uint8
    from sphere_ar_hf.evaluation.digits import load_digit_splits, upscale_digits
    from sphere_ar_hf.training.latent_cache import load_vae

    run = Path(work) / f"seed{seed}" / f"vae-{kind}"
    vae = load_vae(json.loads((run / "done.json").read_text())["vae"]).eval()
    splits = load_digit_splits()
    pick = np.random.default_rng(0).choice(len(splits.train_labels), min(n, len(splits.train_labels)), replace=False)
    x = torch.from_numpy(upscale_digits(splits.train_images[pick], vae.config.image_size))[:, None]
    x = x.repeat(1, vae.config.in_channels, 1, 1)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample(torch.Generator().manual_seed(seed))).sample
    images = to_uint8((recon.float() / 2 + 0.5).clamp(0, 1))
    m = evaluate_digits(ImageSet.from_arrays(images, splits.train_labels[pick]),
                        extractor=digit_features(vae.config.image_size), with_precision_recall=False)
    return _finish(run / f"reconstruction-{n}.json", {"frechet_distance": m["frechet_distance"],
                                                      "accuracy": m["accuracy"], "n": int(len(pick))})


def real_tokens_job(work: str, kind: str, seed: int, threads: int) -> dict:
    """The real tokens' statistics per position: the train split through the S-VAE (one posterior draw each), as
    the AR models were trained on them: ``raw`` (``normalize_tokens=False``) and ``projected`` onto the sphere."""
    _threads(threads)
    from variance_collapse import real_tokens, token_statistics

    from sphere_ar_hf.training.latent_cache import load_vae

    run = Path(work) / f"seed{seed}" / f"vae-{kind}"
    vae = load_vae(json.loads((run / "done.json").read_text())["vae"]).eval()
    return _finish(run / "real-tokens.json", {
        name: token_statistics(*real_tokens(vae, normalize)) for name, normalize in (("raw", False),
                                                                                     ("projected", True))})


def baseline_job(work: str, n: int, threads: int) -> dict:
    """The real-vs-real yardstick: a random train subset of the generated sample's size vs the test split."""
    _threads(threads)
    from sphere_ar_hf.evaluation import feature_statistics, frechet_distance
    from sphere_ar_hf.evaluation.digits import DIGITS_IMAGE_SIZE, reference_images

    extractor = digit_features(DIGITS_IMAGE_SIZE)
    train = extractor(reference_images(DIGITS_IMAGE_SIZE, "train"))["features"]
    test = feature_statistics(extractor(reference_images(DIGITS_IMAGE_SIZE, "test"))["features"])
    pick = np.random.default_rng(0).choice(len(train), min(n, len(train)), replace=False)
    return _finish(Path(work) / f"baseline-{n}.json", {
        "full_train_vs_test": frechet_distance(*feature_statistics(train), *test),
        "same_n_vs_test": frechet_distance(*feature_statistics(train[pick]), *test), "n": int(len(pick))})


# ---- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    done: Path
    fn: object
    args: tuple
    after: tuple[str, ...] = ()
    needs: tuple[float, ...] = ()  # an evaluation: the guidance scales its file must hold
    cost: float = 1.0  # what it counts for on the progress bar (1: a job; ablation_tokens: estimated seconds)

    def finished(self) -> bool:
        if not self.needs:
            return self.done.is_file()
        return set(self.needs) <= eval_scales(self.done)


def plan(args: argparse.Namespace) -> list[Job]:
    work = str(args.work_dir)
    vaes = sorted({VARIANTS[v].vae for v in args.variants})
    jobs = [Job("baseline", args.work_dir / f"baseline-{10 * args.n_per_class}.json", baseline_job,
                (work, 10 * args.n_per_class, args.threads))]
    for s in args.train_seeds:
        d = args.work_dir / f"seed{s}"
        jobs += [Job(f"vae {k} seed {s}", d / f"vae-{k}" / "done.json", vae_job, (work, k, s, args.recipe_args,
                                                                                    args.threads)) for k in vaes]
        jobs += [Job(f"reconstruction {k} seed {s}", d / f"vae-{k}" / f"reconstruction-{10 * args.n_per_class}.json",
                     reconstruction_job, (work, k, s, 10 * args.n_per_class, args.threads), (f"vae {k} seed {s}",))
                 for k in vaes]
        jobs += [Job(f"real tokens {k} seed {s}", d / f"vae-{k}" / "real-tokens.json", real_tokens_job,
                     (work, k, s, args.threads), (f"vae {k} seed {s}",)) for k in vaes]
        for v in args.variants:
            jobs.append(Job(f"ar {v} seed {s}", d / v / "done.json", ar_job,
                            (work, v, s, args.recipe_args, args.threads), (f"vae {VARIANTS[v].vae} seed {s}",)))
            jobs.append(Job(f"eval {v} seed {s}", eval_path(work, v, s, args.steps, args.n_per_class, args.sampler,
                                                            args.time_shift), eval_job,
                            (work, v, s, list(args.guidance_scales), args.n_per_class, args.steps, args.batch_size,
                             args.threads, args.sampler, args.time_shift), (f"ar {v} seed {s}",),
                            tuple(args.guidance_scales)))
    return jobs


def _init_worker(threads: int) -> None:
    _threads(threads)


def run_jobs(jobs: list[Job], workers: int) -> float:
    """Run the unfinished jobs, dependencies first, ``workers`` at a time; returns the seconds taken."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    done = {j.name for j in jobs if j.finished()}
    todo = [j for j in jobs if j.name not in done]
    bar = tqdm(total=sum(j.cost for j in jobs), initial=sum(j.cost for j in jobs if j.name in done),
               desc="ablation", unit="job" if all(j.cost == 1.0 for j in jobs) else "s", dynamic_ncols=True)
    if workers <= 1:
        for job in todo:  # plan() lists every job after its dependencies
            bar.set_postfix_str(job.name)
            job.fn(*job.args)
            bar.update(job.cost)
        bar.close()
        return time.perf_counter() - t0
    import multiprocessing as mp

    running: dict = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        while todo or running:
            for job in [j for j in todo if all(a in done for a in j.after)][:workers - len(running)]:
                todo.remove(job)
                running[pool.submit(job.fn, *job.args)] = job
            bar.set_postfix_str(", ".join(j.name for j in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                future.result()  # a failed job stops the run (finished jobs stay finished)
                done.add(job.name)
                bar.update(job.cost)
    bar.close()
    return time.perf_counter() - t0


def summarize(args: argparse.Namespace) -> dict:
    """Mean, min and max over the training seeds of every variant and guidance scale."""
    baseline = json.loads((args.work_dir / f"baseline-{10 * args.n_per_class}.json").read_text())
    out = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "baseline": baseline, "variants": {}, "train_seconds": 0.0, "eval_seconds": 0.0}
    for v in args.variants:
        per_seed = []
        for s in args.train_seeds:
            d = args.work_dir / f"seed{s}"
            per_seed.append(json.loads(eval_path(args.work_dir, v, s, args.steps, args.n_per_class, args.sampler,
                                                 args.time_shift).read_text()))
            out["train_seconds"] += json.loads((d / v / "done.json").read_text())["seconds"]
            out["eval_seconds"] += per_seed[-1]["seconds"]
        by_scale = [{r["guidance_scale"]: r for r in seed_result["rows"]} for seed_result in per_seed]
        rows = []
        for g in args.guidance_scales:  # by value: a file may hold more scales, in any order
            fd = np.array([r[g]["frechet_distance"] for r in by_scale])
            acc = np.array([r[g]["accuracy"] for r in by_scale])
            std = float(fd.std(ddof=1)) if len(fd) > 1 else 0.0
            rows.append({"guidance_scale": g, "fd_mean": float(fd.mean()), "fd_min": float(fd.min()),
                         "fd_max": float(fd.max()), "fd_std": std, "fd_sem": std / np.sqrt(len(fd)),
                         "fd": fd.tolist(), "accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()),
                         "accuracy": acc.tolist()})
        out["variants"][v] = {"label": VARIANTS[v].label, "rows": rows}
    out["vaes"] = {}
    for k in sorted({VARIANTS[v].vae for v in args.variants}):
        runs = [args.work_dir / f"seed{s}" / f"vae-{k}" for s in args.train_seeds]
        done = [json.loads((r / "done.json").read_text()) for r in runs]
        recon = [json.loads((r / f"reconstruction-{10 * args.n_per_class}.json").read_text()) for r in runs]
        out["train_seconds"] += sum(d["seconds"] for d in done)
        out["vaes"][k] = {key: float(np.mean([d[key] for d in done])) for key in
                          ("test_l1_mode", "test_l1_sample", "kl_per_token", "token_norm_mean", "token_norm_std")}
        out["vaes"][k]["reconstruction_fd"] = [r["frechet_distance"] for r in recon]
    return out


def prepare_data(work_dir: Path) -> None:
    """The train split as the recipe's dataset, written once into ``work_dir`` for every job."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if not (work_dir / "data.json").is_file():
        from sphere_ar_hf.evaluation.digits import DIGITS_IMAGE_SIZE, load_digit_splits, write_digits_dataset

        splits = load_digit_splits()
        shutil.rmtree(work_dir / "data", ignore_errors=True)
        write_digits_dataset(splits.train_images, splits.train_labels, work_dir / "data", DIGITS_IMAGE_SIZE)
        _finish(work_dir / "data.json", {"num_train": len(splits.train_labels)})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = args.out if args.out is not None else args.work_dir / "report"
    if args.from_json is not None:
        summary = json.loads(args.from_json.read_text())
        out.parent.mkdir(parents=True, exist_ok=True)
        print(write_table(summary, out.with_suffix(".md")))
        write_plot(summary, out.with_suffix(".png"))
        print(f"wrote {out}.md and .png from {args.from_json}")
        return summary
    t0 = time.perf_counter()
    prepare_data(args.work_dir)
    seconds = run_jobs(plan(args), args.jobs)
    summary = summarize(args)
    summary["wall_seconds_this_run"] = seconds
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_table(summary, out.with_suffix(".md")))
    write_plot(summary, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}.md, .png and .json")
    print(f"total {time.perf_counter() - t0:.0f} s this run ({len(args.variants)} variants x "
          f"{len(args.train_seeds)} training seeds; job time: training {summary['train_seconds']:.0f} s, evaluation "
          f"{summary['eval_seconds']:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
