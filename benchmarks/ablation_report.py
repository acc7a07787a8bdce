"""What the digits ablation compares (its variants, the paper's numbers) and how its results are reported: the
Markdown tables and the Fréchet-distance plot, from a summary that benchmarks/ablation_digits.py writes (also
re-rendered from its JSON with ``--from-json``; ablation_tokens.py draws its panels with :func:`plot_fd`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GUIDANCE_SCALES = (1.0, 2.0, 3.0, 4.5, 6.0, 8.0)


@dataclass(frozen=True)
class Variant:
    label: str
    vae: str  # key of VAES
    normalize_tokens: bool


# the S-VAEs: recipe flags of examples/train_digits.py
VAES = {
    "gaussian": ["--posterior", "gaussian", "--no-normalize_decoder_input"],
    "gaussian_dec_norm": ["--posterior", "gaussian", "--normalize_decoder_input"],
    "power_spherical": ["--posterior", "power_spherical"],
}
VARIANTS = {
    "gaussian": Variant("diagonal-Gaussian VAE", "gaussian", False),
    "gaussian_dec_norm": Variant("+ normalised decoder input", "gaussian_dec_norm", False),
    "gaussian_ar_norm": Variant("+ normalised AR input / output", "gaussian_dec_norm", True),
    "sphere": Variant("S-VAE, Power Spherical (SphereAR)", "power_spherical", True),
}
PAPER_FID = {"gaussian": 2.97, "gaussian_dec_norm": 2.89, "gaussian_ar_norm": 2.68, "sphere": 2.52}



def sem(row: dict) -> float:
    """The standard error of a row's mean Fréchet distance (summaries written before it was stored included)."""
    fd = np.array(row["fd"])
    return float(fd.std(ddof=1) / np.sqrt(len(fd))) if len(fd) > 1 else 0.0


def write_table(summary: dict, path: Path) -> str:
    s = summary["settings"]
    seeds = len(s["train_seeds"])
    lines = [f"Fréchet distance in the digit classifier's feature space (lower is better): mean ± standard "
             f"deviation over the training seeds, then the standard error of the mean; every cell has {seeds} "
             f"training seed{'s' if seeds != 1 else ''} (one model each, sampled with its own seed; min-max in the "
             f"plot); {10 * s['n_per_class']} images per point, {sampler_text(s)}, linear CFG schedule. Real train "
             f"subset vs real test, same n: {summary['baseline']['same_n_vs_test']:.2f}.", "",
             "| variant | " + " | ".join(f"w = {g:g}" for g in s["guidance_scales"])
             + " | best | paper FID (L, 256 px) |",
             "| --- | " + " | ".join("---:" for _ in s["guidance_scales"]) + " | ---: | ---: |"]
    for v, data in summary["variants"].items():
        cells = [f"{r['fd_mean']:.2f} ± {r['fd_std']:.2f} (SE {sem(r):.2f})" for r in data["rows"]]
        best = min(data["rows"], key=lambda r: r["fd_mean"])
        lines.append(f"| {data['label']} | " + " | ".join(cells) +
                     f" | {best['fd_mean']:.2f} (w = {best['guidance_scale']:g}) | {PAPER_FID[v]} |")
    lines += ["", "Classifier accuracy on the generated digits (the requested class), mean over seeds:", "",
              "| variant | " + " | ".join(f"w = {g:g}" for g in s["guidance_scales"]) + " |",
              "| --- | " + " | ".join("---:" for _ in s["guidance_scales"]) + " |"]
    for data in summary["variants"].values():
        lines.append(f"| {data['label']} | " + " | ".join(f"{100 * r['accuracy_mean']:.1f}%" for r in data["rows"])
                     + " |")
    lines += ["", "The S-VAEs (mean over seeds): reconstruction L1 of the test digits in [-1, 1] (posterior mode), "
              "KL per token to the prior, the norm of the raw draws, and the floor: the Fréchet distance of "
              "reconstructed train digits to the test split (real train digits: "
              f"{summary['baseline']['same_n_vs_test']:.2f}).", "",
              "| S-VAE | used by | test L1 | KL / token | draw norm | reconstruction FD |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for k, vae in summary["vaes"].items():
        users = ", ".join(data["label"] for v, data in summary["variants"].items() if VARIANTS[v].vae == k)
        fd = np.array(vae["reconstruction_fd"])
        lines.append(f"| {k} | {users} | {vae['test_l1_mode']:.3f} | {vae['kl_per_token']:.1f} | "
                     f"{vae['token_norm_mean']:.2f} ± {vae['token_norm_std']:.2f} | {fd.mean():.2f} ± "
                     f"{fd.std(ddof=1) if len(fd) > 1 else 0.0:.2f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def sampler_text(settings: dict) -> str:
    """``100 steps`` (the official sampler), or the sampler, its steps and time shift (a summary written before
    ``--sampler`` existed used the official one)."""
    sampler, shift = settings.get("sampler", "euler_maruyama"), settings.get("time_shift", 1.0)
    if (sampler, shift) == ("euler_maruyama", 1.0):
        return f"{settings['steps']} steps"
    return f"{sampler}, {settings['steps']} steps, time shift {shift:g}"


def write_plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    seeds = len(summary["settings"]["train_seeds"])
    plot_fd(ax, summary,
            f"Digits: Gaussian vs hyperspherical latents ({seeds} training seed{'s' if seeds != 1 else ''})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fd(ax, summary: dict, title: str, legend: bool = True) -> None:
    """Fréchet distance against guidance on ``ax``: per variant the mean and min-max over seeds, its S-VAE's
    reconstruction floor (dotted) and the real-vs-real yardstick (dashed)."""
    floors_drawn = set()
    for v, data in summary["variants"].items():
        g = [r["guidance_scale"] for r in data["rows"]]
        mean = np.array([r["fd_mean"] for r in data["rows"]])
        lo, hi = np.array([r["fd_min"] for r in data["rows"]]), np.array([r["fd_max"] for r in data["rows"]])
        line, = ax.plot(g, mean, marker="o", label=data["label"])
        ax.fill_between(g, lo, hi, color=line.get_color(), alpha=0.18)
        if VARIANTS[v].vae not in floors_drawn:  # the S-VAE's reconstruction floor, once per S-VAE
            floors_drawn.add(VARIANTS[v].vae)
            floor = float(np.mean(summary["vaes"][VARIANTS[v].vae]["reconstruction_fd"]))
            ax.axhline(floor, color=line.get_color(), ls=":", lw=1)
    ax.axhline(summary["baseline"]["same_n_vs_test"], color="gray", ls="--", lw=1, label="real vs real, same n")
    ax.plot([], [], color="gray", ls=":", lw=1, label="its S-VAE's reconstructions (dotted)")
    ax.set(xlabel="classifier-free guidance scale", ylabel="Fréchet distance (digit features)")
    ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if legend:
        ax.legend(fontsize=8)
