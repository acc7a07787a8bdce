"""Variance collapse made visible: the norm and spread of generated tokens along the decoding position.

    python benchmarks/ablation_digits.py            # first: trains the four variants
    python benchmarks/variance_collapse.py          # then: docs/variance_collapse.{png,md,json}

For each variant of ``benchmarks/ablation_digits.py`` (its ``--work-dir``, training seed ``--train-seed``) and each
guidance scale, samples ``--n-per-class`` x 10 images' tokens (``output_type="latent"``, one generator per image,
100 steps) and measures, at every decoding position (first token to last):

* the mean and standard deviation of the token norm (the sphere's radius is sqrt(d) = 4);
* the within-class variance per dimension (the variance over the images of one class, averaged over the d
  dimensions and the classes): the spread that guidance shrinks.

The same statistics of encoded real images (the train split, one posterior draw each, made into AR tokens as the
variant's trainer did) are the reference. Writes ``<out>.png`` (a column per variant: norm and variance against
position, a line per guidance scale, real images dashed), ``<out>.md`` and ``<out>.json``.

``benchmarks/ablation_tokens.py`` gets the same statistics without a second sampling pass: its evaluations record
the tokens while they sample (:class:`TokenRecorder`), for every training seed, and it draws them with
:func:`write_plot` and :func:`write_table` (mean over the seeds, their range shaded).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "src", ROOT / "benchmarks"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from ablation_report import GUIDANCE_SCALES, VARIANTS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "ablation_digits",
                   help="the --work-dir of benchmarks/ablation_digits.py (its trained pipelines)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "variance_collapse",
                   help="writes <out>.png, <out>.md and <out>.json")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--train-seed", type=int, default=0, help="whose trained pipelines")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=list(GUIDANCE_SCALES))
    p.add_argument("--n-per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


class TokenRecorder:
    """A ``callback_on_step_end`` that keeps the tokens of every image that ``sample_images`` makes with it, in
    order: ``(num_images, num_tokens, latent_dim)`` from :meth:`tokens`, the same tokens the pipeline decodes
    (projected onto the sphere when the model has ``normalize_tokens``). Each pipeline call's rows are its images
    (padded to a multiple of ``ROW_QUANTUM``, the padding last) and, under guidance, as many unconditional rows after
    them; a call of ``k`` images of ``batch_size`` is kept as its first ``k`` rows."""

    def __init__(self, num_images: int, batch_size: int, num_tokens: int, guidance_scale: float):
        self.sizes = [min(batch_size, num_images - start) for start in range(0, num_images, batch_size)]
        self.num_tokens, self.guided = num_tokens, guidance_scale > 1.0
        self._call: list[torch.Tensor] = []
        self._done: list[torch.Tensor] = []

    def __call__(self, pipe, i: int, t: int, kwargs: dict) -> dict:
        token = kwargs["token"]
        self._call.append(token[:token.shape[0] // 2 if self.guided else token.shape[0]].float().cpu())
        if i == self.num_tokens - 1:  # the call's last token
            self._done.append(torch.stack(self._call, dim=1)[:self.sizes[len(self._done)]])
            self._call = []
        return {}  # the token goes on unchanged

    def tokens(self) -> torch.Tensor:
        if len(self._done) != len(self.sizes) or self._call:
            raise RuntimeError(f"recorded {len(self._done)} of {len(self.sizes)} pipeline calls")
        return torch.cat(self._done)


def token_statistics(tokens: torch.Tensor, labels: np.ndarray) -> dict[str, list[float]]:
    """Per position of ``tokens`` (N, L, d): mean and std of the norm, and the within-class variance per dimension
    (over the images of each class that has two or more, averaged over dimensions and classes; NaN if none has)."""
    tokens = tokens.double()
    norms = tokens.norm(dim=-1)  # (N, L)
    labels_t = torch.as_tensor(labels)
    classes, counts = torch.unique(labels_t, return_counts=True)
    within = torch.stack([tokens[labels_t == c].var(dim=0, unbiased=True).mean(dim=-1)
                          for c in classes[counts > 1]]).mean(dim=0) if (counts > 1).any() else \
        torch.full(tokens.shape[1:2], float("nan"), dtype=tokens.dtype)  # (L,)
    return {"norm_mean": norms.mean(0).tolist(), "norm_std": norms.std(0).tolist(), "within_class_var": within.tolist()}


@torch.no_grad()
def real_tokens(vae, normalize: bool, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The train split's tokens through ``vae`` as an AR model with ``normalize_tokens=normalize`` was trained on
    them (one posterior draw per image)."""
    from sphere_ar_hf.evaluation.digits import load_digit_splits, upscale_digits

    splits = load_digit_splits()
    x = torch.from_numpy(upscale_digits(splits.train_images, vae.config.image_size))[:, None]
    x = x.repeat(1, vae.config.in_channels, 1, 1)
    dist = vae.encode(x).latent_dist
    return vae.tokens(dist.sample(torch.Generator().manual_seed(seed)).float(), normalize=normalize), \
        np.asarray(splits.train_labels)


@torch.no_grad()
def generated_tokens(pipe, n_per_class: int, guidance: float, steps: int, seed: int, batch_size: int
                     ) -> tuple[torch.Tensor, np.ndarray]:
    from sphere_ar_hf.evaluation import image_labels, image_seeds

    indices = np.arange(10 * n_per_class)
    labels = image_labels(seed, indices, pipe.transformer.config.num_classes, "balanced")
    seeds = image_seeds(seed, indices)
    out = []
    for i in range(0, len(labels), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out.append(pipe(labels[i:i + batch_size].tolist(), generator=gens, guidance_scale=guidance,
                        num_inference_steps=steps, output_type="latent").images.float().cpu())
    return torch.cat(out), labels


def measure(args: argparse.Namespace) -> dict:
    from sphere_ar_hf import SphereARPipeline

    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "radius": None, "variants": {}}
    for v in args.variants:
        done = json.loads((args.work_dir / f"seed{args.train_seed}" / v / "done.json").read_text())
        pipe = SphereARPipeline.from_pretrained(done["pipeline"])
        pipe.set_progress_bar_config(disable=True)
        normalize = pipe.transformer.config.normalize_tokens
        if normalize != VARIANTS[v].normalize_tokens:
            raise ValueError(f"{done['pipeline']}: normalize_tokens={normalize}, variant {v} has "
                             f"{VARIANTS[v].normalize_tokens}")
        results["radius"] = pipe.vae.latent_radius
        tokens, labels = real_tokens(pipe.vae, normalize)
        entry = {"label": VARIANTS[v].label, "normalize_tokens": normalize, "posterior": pipe.vae.config.posterior,
                 "real": token_statistics(tokens, labels), "generated": {}}
        for g in args.guidance_scales:
            tokens, labels = generated_tokens(pipe, args.n_per_class, g, args.steps, args.seed, args.batch_size)
            entry["generated"][f"{g:g}"] = token_statistics(tokens, labels)
        results["variants"][v] = entry
    return results


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(2, len(variants), figsize=(3.3 * len(variants), 6.0), dpi=120, squeeze=False,
                             sharex=True, sharey="row")  # one scale per row: the sphere's flat lines stay flat
    cmap = plt.get_cmap("viridis")
    for col, entry in enumerate(variants.values()):
        scales = list(entry["generated"])
        for row, key in enumerate(("norm_mean", "within_class_var")):
            ax = axes[row, col]
            positions = np.arange(1, len(entry["real"][key]) + 1)
            many = len(positions) > 12
            for i, g in enumerate(scales):
                color = cmap(i / max(1, len(scales) - 1))
                ax.plot(positions, entry["generated"][g][key], marker="" if many else "o", ms=3, color=color,
                        label=f"w = {g}")
                if "generated_range" in entry:  # min-max over training seeds
                    lo, hi = entry["generated_range"][g][key]
                    ax.fill_between(positions, lo, hi, color=color, alpha=0.15, lw=0)
            ax.plot(positions, entry["real"][key], "k--", lw=1.5, label="real (encoded)")
            if key == "norm_mean":
                ax.axhline(results["radius"], color="gray", lw=0.8, ls=":")
                ax.set_title(entry["label"], fontsize=9)
            ax.set_xticks(positions[::max(1, len(positions) // 8)] if many else positions)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("mean token norm" if key == "norm_mean" else "within-class variance / dim")
            if row == 1:
                ax.set_xlabel("decoding position")
    axes[0, -1].legend(fontsize=7)
    seeds = results["settings"].get("train_seeds")
    fig.suptitle("Generated tokens along the decoding position, per guidance scale (digits"
                 + (f";\nmean over {len(seeds)} training seeds, min-max shaded)" if seeds else ")"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(results: dict, path: Path) -> str:
    s = results["settings"]
    seeds = f"training seed {s['train_seed']}" if "train_seed" in s else \
        f"mean over training seeds {', '.join(map(str, s['train_seeds']))}"
    steps = f"{s['steps']} steps" + (f" ({s['sampler']}, time shift {s['time_shift']:g})" if s.get("sampler") else "")
    lines = [f"Token norm (mean over the images, first -> last position; its std: mean over positions) and "
             f"within-class variance per dimension (generated / real, mean over positions, then over the first and "
             f"the last quarter of the positions); {10 * s['n_per_class']} images per guidance scale, {steps}, "
             f"{seeds}; radius sqrt(d) = {results['radius']:g}.", "",
             "| variant | tokens | norm, first -> last | norm std | within-class variance, generated / real | "
             "same, first -> last quarter |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for entry in results["variants"].values():
        rows = [("real (encoded)", entry["real"])] + [(f"w = {g}", st) for g, st in entry["generated"].items()]
        real = np.asarray(entry["real"]["within_class_var"])
        quarter = max(1, len(real) // 4)
        for name, st in rows:
            var = np.asarray(st["within_class_var"])
            first, last = (var[:quarter].mean() / real[:quarter].mean(), var[-quarter:].mean() / real[-quarter:].mean())
            lines.append(f"| {entry['label']} | {name} | {st['norm_mean'][0]:.3f} -> {st['norm_mean'][-1]:.3f} | "
                         f"{np.mean(st['norm_std']):.3f} | {var.mean() / real.mean():.2f} | {first:.2f} -> "
                         f"{last:.2f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = measure(args)
    results["seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(write_table(results, args.out.with_suffix(".md")))
    write_plot(results, args.out.with_suffix(".png"))
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}.png, .md and .json; total {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
