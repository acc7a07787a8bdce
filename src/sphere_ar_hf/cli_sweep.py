"""``sphere-ar sweep``: sample and evaluate a grid of guidance scales (x steps x samplers x CFG schedules x seeds)
and tabulate the metrics with their seed noise (library: :mod:`.evaluation.sweep`)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .cli_common import CLIError, finite_float, load_pipeline, one_line, positive_int, resolve_model, set_threads
from .cli_sampling import add_feature_options, add_sampling_options, model_id, process_group, sampling_device
from .options import CFG_SCHEDULES, SAMPLERS
from .utils import plural

__all__ = ["add_sweep_parser", "cmd_sweep"]

PNG_NOTE = "note: sweep.png needs matplotlib (pip install matplotlib); sweep.json and sweep.md are written without it"


def _sweep_settings(args: argparse.Namespace, model: str, samplers: list[str], time_shift: float):
    from .evaluation.sweep import SweepSettings

    reference = str(args.reference.expanduser().resolve()) if args.reference is not None else None
    return SweepSettings(
        model=model, num_images=args.num_images, labels=args.labels, seed=args.seed, seeds=args.seeds,
        guidance_scales=list(args.guidance_scales), steps=list(args.steps), samplers=samplers,
        cfg_schedules=list(args.cfg_schedule), time_shift=time_shift, dtype=args.dtype, shard_size=args.shard_size,
        features=args.features, reference=reference, k=args.k)


def cmd_sweep(args: argparse.Namespace) -> int:
    from .evaluation.sweep import format_table, run_sweep

    model = resolve_model(args.model)
    try:  # the flags, before the model loads (the model's sampler and time shift are filled in below)
        _sweep_settings(args, model_id(model), list(args.sampler or SAMPLERS[:1]), args.time_shift or 1.0).check()
    except ValueError as e:
        raise CLIError(one_line(e)) from None
    if args.features == "digits" and args.inception_weights is not None:
        raise CLIError("--inception-weights is used only with --features inception")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    threads = set_threads(args.threads)
    with process_group() as (rank, world, local_rank, barrier):
        if not has_matplotlib and rank == 0:
            print(PNG_NOTE, file=sys.stderr)
        device = sampling_device(args.device, world, local_rank)
        pipe = load_pipeline(model, args.dtype)
        scheduler = pipe.scheduler.config
        time_shift = float(args.time_shift if args.time_shift is not None else scheduler.time_shift)
        sweep = _sweep_settings(args, model_id(model), list(args.sampler or [scheduler.sampler]), time_shift)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        try:
            summary = run_sweep(pipe, args.output_dir, sweep, batch_size=args.batch_size, resume=args.resume,
                                device=device, eval_batch_size=args.eval_batch_size,
                                inception_weights=args.inception_weights, rank=rank, world_size=world,
                                barrier=barrier, log=lambda message: print(message, file=sys.stderr))
        except (ValueError, ImportError) as e:
            raise CLIError(one_line(e)) from None
    if summary is None:
        return 0
    print(format_table(summary))
    best = next(r for r in summary["results"] if r["best"])
    fd = best["metrics"]["fd"]
    spread = f" ± {fd['std']:.3g} (SE {fd['se']:.2g})" if fd["std"] is not None else ""
    close = [r["name"] for r in summary["results"] if r["within_noise"] and not r["best"]]
    print(f"best by FD: {best['name']}: {fd['mean']:.4g}{spread}"
          + (f"; within noise of it: {', '.join(close)}" if close else ""))
    outputs = "sweep.json, sweep.md" + (", sweep.png" if has_matplotlib else "")
    print(f"wrote {args.output_dir}/{{{outputs}}}: {plural(len(summary['results']), 'setting')} x "
          f"{plural(len(summary['seeds']), 'seed')} x {plural(args.num_images, 'image')}, "
          f"{plural(world, 'process', 'processes')} of {plural(threads, 'thread')}")
    if not has_matplotlib:
        print(PNG_NOTE, file=sys.stderr)
    return 0


def add_sweep_parser(sub, fmt) -> None:
    """Register ``sphere-ar sweep``."""
    p = sub.add_parser(
        "sweep", formatter_class=fmt, help="search the guidance scale: sample and evaluate a grid of settings",
        description="Sample --num-images images for every setting (guidance scale x steps x sampler x CFG schedule) "
                    "and seed, each run exactly as `sphere-ar sample` would with the same flags (DIR/<setting>_seed-"
                    "<S>/), evaluate each as `sphere-ar evaluate` would (its metrics.json), and write DIR/sweep.json, "
                    "sweep.md and sweep.png: every setting's metrics with the mean, standard deviation and standard "
                    "error over --seeds seeds, and which settings are within noise of the best. Works under torchrun "
                    "like `sample` (rank 0 evaluates); --resume samples only what is missing and evaluates only runs "
                    "without metrics.json.",
        epilog="example: sphere-ar sweep --guidance-scales 1 1.5 2 3 4.5 --features digits --num-images 1000 "
               "--seeds 4 --labels balanced --output-dir sweeps/digits")
    add_sampling_options(p, "folder of the sweep: a run folder per setting and seed, sweep_settings.json and the "
                            "outputs")
    p.add_argument("--guidance-scales", nargs="+", required=True, type=finite_float, metavar="F",
                   help="classifier-free guidance scales to try (<= 1 disables guidance)")
    p.add_argument("--steps", nargs="+", type=positive_int, metavar="K", default=[100],
                   help="sampler steps per token to try")
    p.add_argument("--sampler", nargs="+", choices=SAMPLERS, default=None,
                   help="per-token samplers to try (default: the model's scheduler)")
    p.add_argument("--cfg-schedule", nargs="+", choices=CFG_SCHEDULES, default=["linear"],
                   help="guidance schedules over the tokens to try")
    p.add_argument("--seeds", type=positive_int, metavar="K", default=1,
                   help="seeds per setting, --seed to --seed + K - 1 (K >= 2 gives standard errors)")
    p.add_argument("--reference", type=Path, metavar="REF", default=None,
                   help="reference images or statistics (.npz or folder) as `evaluate` takes them; optional with "
                        "--features digits (the held-out real digits)")
    add_feature_options(p)
    p.add_argument("--eval-batch-size", type=positive_int, metavar="N", default=64,
                   help="images per forward pass of the feature network")
    p.set_defaults(func=cmd_sweep)
