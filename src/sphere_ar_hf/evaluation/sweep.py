"""``sphere-ar sweep``: sample and evaluate a grid of sampling settings (guidance scale x steps x sampler x CFG
schedule, each with one or more seeds), as the paper's authors searched the guidance scale.

Every (setting, seed) is one :func:`~.sampling.run_sampling` run in ``DIR/<setting>_seed-<S>/`` with exactly the
:class:`~.sampling.SamplingSettings` that ``sphere-ar sample`` records for the same flags, so its images, and the
metrics that :func:`~.evaluate.evaluate` gives them (stored in its ``metrics.json``), are those of ``sample`` +
``evaluate``. The sweep's own flags are recorded in ``DIR/sweep_settings.json``; a resumed sweep must match them,
samples only the missing shards and evaluates only runs without ``metrics.json``. At the end ``DIR/sweep.json``,
``DIR/sweep.md`` and ``DIR/sweep.png`` (with matplotlib) summarise every setting: the mean, standard deviation
and standard error over its seeds, and whether its Fréchet distance is within noise of the best setting's.

Noise: the runs of two settings with the same seed share their labels and initial noise draws, so a setting is
compared with the best through the paired differences of their per-seed Fréchet distances: it is *within noise*
when the mean difference is at most :data:`NOISE_SIGMAS` standard errors of that difference.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..configuration_sphere_ar import check_guidance_scale
from ..options import CFG_SCHEDULES, FEATURE_SPACES, LABEL_MODES, MAX_SEED, SAMPLERS
from ..scheduling_sphere_ar import check_num_inference_steps
from ..utils import atomic_write, remove_stale_temporaries
from .evaluate import evaluate
from .sampling import SamplingSettings, check_recorded_settings, run_sampling, sampling_settings, set_sampler

__all__ = ["METRICS", "NOISE_SIGMAS", "SweepPoint", "SweepSettings", "evaluate_run", "format_table", "plot_sweep",
           "run_sweep", "summarize", "write_outputs"]

NOISE_SIGMAS = 2.0  # "within noise": a paired mean difference of at most this many standard errors
# summary key -> the keys of evaluate()'s result it is read from, and its name in tables and plots
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "fd": (("fid", "frechet_distance"), "FD"),
    "sfid": (("sfid",), "sFID"),
    "inception_score": (("inception_score",), "IS"),
    "precision": (("precision",), "precision"),
    "recall": (("recall",), "recall"),
    "accuracy": (("accuracy",), "accuracy"),
}


def _number(value: float) -> str:
    """``2``, ``1.5``, or the full repr when ``%g`` would round the value."""
    text = format(value, "g")
    return text if float(text) == value else repr(value)


@dataclass(frozen=True)
class SweepPoint:
    """One setting of the grid."""

    guidance_scale: float
    steps: int
    sampler: str
    cfg_schedule: str

    @property
    def name(self) -> str:
        return f"guidance-{_number(self.guidance_scale)}_steps-{self.steps}_{self.sampler}_{self.cfg_schedule}"

    def folder(self, seed: int) -> str:
        """The run folder of this setting with ``seed``, relative to the sweep's folder."""
        return f"{self.name}_seed-{seed}"


@dataclass(frozen=True)
class SweepSettings:
    """A sweep's flags (``DIR/sweep_settings.json``; a resumed sweep must match them). ``seeds`` seeds from
    ``seed`` on: ``seed``, ``seed + 1``, ... (seeds S and S + 1 share no image)."""

    model: str
    num_images: int
    labels: str
    seed: int
    seeds: int
    guidance_scales: list[float]
    steps: list[int]
    samplers: list[str]
    cfg_schedules: list[str]
    time_shift: float
    dtype: str
    shard_size: int
    features: str
    reference: str | None = None
    k: int = 3

    differences = SamplingSettings.differences

    def points(self) -> list[SweepPoint]:
        return [SweepPoint(float(g), int(s), sampler, schedule) for sampler in self.samplers
                for schedule in self.cfg_schedules for s in self.steps for g in self.guidance_scales]

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))

    def check(self) -> None:
        """One-line ``ValueError`` naming the field, the value and what is expected."""
        if not self.guidance_scales:
            raise ValueError("guidance_scales: none given; expected one or more scales")
        for g in self.guidance_scales:
            if check_guidance_scale(g) < 0:
                raise ValueError(f"guidance_scales: {g!r}; expected finite scales >= 0 (<= 1 disables guidance)")
        for name, values, allowed in (("guidance_scales", self.guidance_scales, None), ("steps", self.steps, None),
                                      ("samplers", self.samplers, SAMPLERS),
                                      ("cfg_schedules", self.cfg_schedules, CFG_SCHEDULES)):
            if not values:
                raise ValueError(f"{name}: none given; expected one or more values")
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"{name}: {', '.join(dupes)} given twice; expected each setting once")
            if allowed is not None and set(values) - set(allowed):
                raise ValueError(f"{name}: {sorted(set(values) - set(allowed))}; expected some of {list(allowed)}")
        if len([g for g in self.guidance_scales if g <= 1]) > 1:
            low = ", ".join(_number(g) for g in self.guidance_scales if g <= 1)
            raise ValueError(f"guidance_scales: {low} all disable guidance (<= 1), so they are one setting; "
                             "expected at most one of them")
        for steps in self.steps:
            check_num_inference_steps(steps)
        if self.num_images < 2:
            raise ValueError(f"num_images: {self.num_images}; expected >= 2 (a covariance needs two images)")
        if self.seeds < 1 or self.seed < 0 or self.seed + self.seeds - 1 > MAX_SEED:
            raise ValueError(f"seeds: {self.seeds} from seed {self.seed}; expected >= 1 seeds within [0, 2**64)")
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels: {self.labels!r}; expected one of {LABEL_MODES}")
        if self.features not in FEATURE_SPACES:
            raise ValueError(f"features: {self.features!r}; expected one of {FEATURE_SPACES}")
        if self.features == "inception" and self.reference is None:
            raise ValueError("reference: none given; Inception features need reference images or statistics "
                             "(e.g. VIRTUAL_imagenet256_labeled.npz)")
        if self.reference is not None and not Path(self.reference).exists():
            raise ValueError(f"reference: {self.reference}: no such file or folder")


def _prepare(output_dir: Path, sweep: SweepSettings, resume: bool) -> None:
    """The checks every rank makes before anything is written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    check_recorded_settings(output_dir / "sweep_settings.json", sweep.differences, resume, "a sweep")


def evaluate_run(folder: Path, sweep: SweepSettings, device: Any = "cpu", batch_size: int = 64,
                 inception_weights: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate ``folder/samples.npz`` as ``sphere-ar evaluate`` does and store the result atomically in
    ``folder/metrics.json``; returns it."""
    result = evaluate(folder / "samples.npz", sweep.reference, features=sweep.features,
                      inception_weights=inception_weights, device=device, batch_size=batch_size, k=sweep.k)
    result["gen"] = "samples.npz"  # relative: the record does not depend on where the sweep lives
    result["metrics"] = {key: float(result[name]) for key, (names, _) in METRICS.items() for name in names
                         if name in result}
    with atomic_write(folder / "metrics.json", "w") as f:
        json.dump(result, f, indent=1)
    return result


def run_sweep(pipe, output_dir: str | os.PathLike, sweep: SweepSettings, batch_size: int = 32, resume: bool = False,
              device: Any = "cpu", eval_batch_size: int = 64, inception_weights: str | os.PathLike | None = None,
              rank: int = 0, world_size: int = 1, barrier: Callable[[], None] = lambda: None,
              show_progress: bool = True, log: Callable[[str], Any] = print) -> dict[str, Any] | None:
    """Sample and evaluate every (setting, seed) of ``sweep`` into ``output_dir`` (see the module docstring), then
    (rank 0) write ``sweep.json``, ``sweep.md`` and ``sweep.png``; returns the summary on rank 0, else ``None``.
    ``pipe`` must be on its device with the sweep's dtype; its scheduler is replaced per sampler."""
    sweep.check()
    for point in sweep.points():  # every setting before the first is sampled: no refusal hours into a sweep
        set_sampler(pipe, point.sampler, sweep.time_shift)
        pipe.check_inputs(batch_size, point.guidance_scale, point.cfg_schedule, point.steps, None, "np")
    output_dir = Path(output_dir)
    _prepare(output_dir, sweep, resume)
    barrier()
    record = output_dir / "sweep_settings.json"
    if rank == 0 and not record.is_file():
        with atomic_write(record, "w") as f:
            json.dump(asdict(sweep), f, indent=1)
    barrier()
    runs = [(point, seed) for point in sweep.points() for seed in sweep.seed_list()]
    todo = [(p, s) for p, s in runs if not (output_dir / p.folder(s) / "metrics.json").is_file()]
    if todo != runs and rank == 0:
        log(f"resuming: {len(runs) - len(todo)} of {len(runs)} runs already evaluated")
    for i, (point, seed) in enumerate(todo):
        folder = output_dir / point.folder(seed)
        set_sampler(pipe, point.sampler, sweep.time_shift)
        settings = sampling_settings(pipe, sweep.model, sweep.num_images, seed, sweep.labels, point.guidance_scale,
                                     point.cfg_schedule, point.steps, sweep.dtype, sweep.shard_size)
        run_sampling(pipe, folder, settings, batch_size=batch_size, resume=True, rank=rank, world_size=world_size,
                     barrier=barrier, show_progress=show_progress)
        if rank == 0:
            metrics = evaluate_run(folder, sweep, device, eval_batch_size, inception_weights)["metrics"]
            log(f"[{i + 1}/{len(todo)}] {folder.name}: " + ", ".join(
                f"{METRICS[k][1]} {v:.4g}" for k, v in metrics.items()))
        barrier()
    if rank != 0:
        return None
    summary = summarize(output_dir, sweep)
    write_outputs(output_dir, summary)
    return summary


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (ddof 1) and standard error of the mean over seeds (``None`` for one seed)."""
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if len(a) > 1 else None
    return {"mean": float(a.mean()), "std": std, "se": std / math.sqrt(len(a)) if std is not None else None,
            "values": [float(v) for v in a]}


def summarize(output_dir: str | os.PathLike, sweep: SweepSettings) -> dict[str, Any]:
    """The summary of a finished sweep (``sweep.json``) from its runs' ``metrics.json``."""
    output_dir = Path(output_dir)
    seeds = sweep.seed_list()
    results = []
    for point in sweep.points():
        per_seed = [json.loads((output_dir / point.folder(s) / "metrics.json").read_text())["metrics"] for s in seeds]
        metrics = {k: _spread([m[k] for m in per_seed]) for k in METRICS if all(k in m for m in per_seed)}
        results.append({"name": point.name, **asdict(point), "seeds": seeds,
                        "folders": [point.folder(s) for s in seeds], "metrics": metrics})
    best = min(results, key=lambda r: r["metrics"]["fd"]["mean"])
    for r in results:
        diffs = np.subtract(r["metrics"]["fd"]["values"], best["metrics"]["fd"]["values"])
        delta = _spread(list(diffs))
        r["fd_vs_best"] = {"mean": delta["mean"], "se": delta["se"]}
        r["best"] = r is best
        r["within_noise"] = True if r is best else (
            None if delta["se"] is None else bool(delta["mean"] <= NOISE_SIGMAS * delta["se"]))
    return {"settings": asdict(sweep), "features": sweep.features, "num_images": sweep.num_images,
            "seeds": seeds, "best": best["name"], "noise_rule": (
                f"within noise: the mean paired difference of FD from the best setting (same seeds) is at most "
                f"{NOISE_SIGMAS:g} standard errors of that difference"), "results": results}


def _cell(m: dict[str, Any] | None, digits: int = 4) -> str:
    if m is None:
        return ""
    if m["std"] is None:
        return f"{m['mean']:.{digits}g}"
    return f"{m['mean']:.{digits}g} ± {m['std']:.2g} (SE {m['se']:.2g})"


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table: one row per setting, the best and those within noise of it marked."""
    keys = [k for k in METRICS if any(k in r["metrics"] for r in summary["results"])]
    several = len(summary["seeds"]) > 1
    head = ["guidance", "steps", "sampler", "CFG schedule", *(METRICS[k][1] for k in keys)]
    head += ["FD - best (SE)", "vs best"] if several else []
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 4 + ["---:"] * (len(head) - 4)) + " |"]
    for r in summary["results"]:
        row = [_number(r["guidance_scale"]), str(r["steps"]), r["sampler"], r["cfg_schedule"],
               *(_cell(r["metrics"].get(k)) for k in keys)]
        if several:
            d = r["fd_vs_best"]
            row += ["" if r["best"] else f"{d['mean']:+.3g} ({d['se']:.2g})",
                    "**best**" if r["best"] else ("within noise" if r["within_noise"] else "worse")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_sweep(summary: dict[str, Any], path: str | os.PathLike) -> None:
    """Each metric against the guidance scale, one line per (steps, sampler, schedule), standard errors as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fd", "inception_score", "accuracy", "precision", "recall")
            if any(k in r["metrics"] for r in summary["results"])]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), dpi=110, squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in summary["results"]:
        groups.setdefault(f"{r['steps']} steps, {r['sampler']}, {r['cfg_schedule']}", []).append(r)
    for ax, key in zip(axes[0], keys):
        for label, rs in groups.items():
            rs = sorted((r for r in rs if key in r["metrics"]), key=lambda r: r["guidance_scale"])
            ax.errorbar([r["guidance_scale"] for r in rs], [r["metrics"][key]["mean"] for r in rs],
                        yerr=[r["metrics"][key]["se"] or 0.0 for r in rs], marker="o", capsize=3, label=label)
        ax.set_xlabel("guidance scale")
        ax.set_title(METRICS[key][1] + (" (lower is better)" if key == "fd" else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['features']} features, {summary['num_images']} images x {len(summary['seeds'])} seeds "
                 "per point (bars: standard error)", fontsize=9)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def write_outputs(output_dir: Path, summary: dict[str, Any]) -> None:
    """``sweep.json``, ``sweep.md`` and (with matplotlib) ``sweep.png``, each atomically."""
    with atomic_write(output_dir / "sweep.json", "w") as f:
        json.dump(summary, f, indent=1)
    best = next(r for r in summary["results"] if r["best"])
    text = (f"# Sweep: {summary['features']} features, {summary['num_images']} images per run, "
            f"seeds {summary['seeds']}\n\n{format_table(summary)}\n\nBest by FD: {best['name']}. "
            f"{summary['noise_rule'][0].upper() + summary['noise_rule'][1:]}.\n")
    with atomic_write(output_dir / "sweep.md", "w", encoding="utf-8") as f:
        f.write(text)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    plot_sweep(summary, output_dir / "sweep.png")
