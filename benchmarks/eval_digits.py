"""Quality of the bundled digits model (or any 10-class digits pipeline): classifier accuracy and Fréchet distance.

    python benchmarks/eval_digits.py                          # the bundled model, default settings + both sweeps
    python benchmarks/eval_digits.py --n-per-class 200 --sweep-n-per-class 50 --json results.json
    python benchmarks/eval_digits.py --model path/to/pipeline --no-sweep

A small MLP classifier (``sphere_ar_hf.evaluation.digits.DigitClassifier``) is trained on the real train split (the
split the model was trained on) at the generated images' resolution; its accuracy on the held-out real test split is
reported. Then, for generated images (``--n-per-class`` per class):

* (a) the classifier's accuracy on them, per class and overall (does the image show the requested digit?);
* (b) the Fréchet distance between their classifier features (last hidden layer) and those of the held-out real
  test images, next to the same distance between the real train and real test splits (the baseline);
* (c) both over guidance scales 1, 2, 3, 4.5, 6, 8 (at the default steps) and over 5, 10, 25, 50, 100 steps (at
  the default guidance), with ``--sweep-n-per-class`` images per class, and the wall time per image.

The default setting is the model's recommended guidance (``transformer.config.guidance_scale``) and 100 steps
(the pipeline's and the CLI's default). Targets there: accuracy >= 95%, Fréchet distance <= 2x the baseline.
Writes a grid of generated digits (one row per class) to ``--grid`` (default docs/digits_grid.png).
Numbers are measurements, not assertions (tests/test_digits.py checks a small sample).

The images are those of ``sphere-ar sample --labels balanced --num-images N --seed S`` (one generator per image,
stored as uint8), measured by ``sphere_ar_hf.evaluation.evaluate_digits`` against the held-out real digits stored
the same way: the numbers of ``sphere-ar evaluate samples.npz --features digits`` (tests/test_evaluation.py checks
that the two agree).
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
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf import SphereARPipeline  # noqa: E402
from sphere_ar_hf.evaluation import (  # noqa: E402
    ImageSet,
    evaluate_digits,
    feature_statistics,
    frechet_distance,
    image_labels,
    image_seeds,
    sample_images,
)
from sphere_ar_hf.evaluation.digits import DigitFeatures, bundled_digits_path, load_digit_splits, reference_images  # noqa: E402

GUIDANCE_SWEEP = (1.0, 2.0, 3.0, 4.5, 6.0, 8.0)
STEPS_SWEEP = (5, 10, 25, 50, 100)
DEFAULT_STEPS = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the bundled digits model)")
    p.add_argument("--n-per-class", type=int, default=100, help="generated images per class at the default setting")
    p.add_argument("--sweep-n-per-class", type=int, default=100, help="generated images per class in each sweep point")
    p.add_argument("--guidance-scales", type=float, nargs="+", default=list(GUIDANCE_SWEEP))
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS_SWEEP))
    p.add_argument("--default-steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--no-sweep", action="store_true", help="only the default setting")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a busy machine)")
    p.add_argument("--grid", default=str(ROOT / "docs" / "digits_grid.png"),
                   help="grid of generated digits, one row per class ('' to skip)")
    p.add_argument("--grid-cols", type=int, default=12)
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    return p.parse_args(argv)


def write_grid(images: np.ndarray, labels: np.ndarray, path: Path, cols: int, scale: int = 4) -> None:
    """One row per class: the first ``cols`` uint8 images of each class, each upscaled ``scale`` x (nearest)."""
    from PIL import Image

    from sphere_ar_hf.cli import make_grid, save_image_atomically

    tiles = []
    for c in np.unique(labels):
        for im in images[labels == c][:cols]:
            pil = Image.fromarray(im)
            tiles.append(pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_atomically(make_grid(tiles, cols, padding=2, background=(64, 64, 64)), path)


def mean_std_se(values: list[float], fmt: str = ".3f") -> str:
    """``mean ± std (SE se)`` of ``values`` (sample std, standard error std / sqrt(n)), each formatted by ``fmt``."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{float(np.mean(values)):{fmt}} ± {std:{fmt}} (SE {std / len(values) ** 0.5:{fmt}})"


class Baselines:
    """Real-vs-real Fréchet distances: the full train split vs the test split, and a random train subset of the
    generated sample's size vs the test split (the distance grows as samples shrink: the fair yardstick of a
    smaller sample)."""

    def __init__(self, train_features: np.ndarray, test_features: np.ndarray, seed: int = 0):
        self.train, self.test, self.seed = train_features, test_features, seed
        self.test_stats = feature_statistics(test_features)
        self.full = frechet_distance(*feature_statistics(train_features), *self.test_stats)
        self._by_n: dict[int, float] = {}

    def same_n(self, n: int) -> float:
        if n >= len(self.train):
            return self.full
        if n not in self._by_n:
            pick = np.random.default_rng(self.seed).choice(len(self.train), n, replace=False)
            self._by_n[n] = frechet_distance(*feature_statistics(self.train[pick]), *self.test_stats)
        return self._by_n[n]


def generate(pipe, num_images: int, seed: int, batch_size: int, guidance: float, steps: int):
    """What ``sphere-ar sample --labels balanced --num-images N --seed S`` samples: uint8 images and labels."""
    indices = np.arange(num_images)
    labels = image_labels(seed, indices, pipe.transformer.config.num_classes, "balanced")
    t0 = time.perf_counter()
    images = sample_images(pipe, labels, image_seeds(seed, indices), batch_size, guidance_scale=guidance,
                           num_inference_steps=steps)
    return images, labels, time.perf_counter() - t0


def measure(name: str, pipe, extractor, baselines: Baselines, num_images: int, args, guidance: float,
            steps: int) -> tuple[dict, np.ndarray, np.ndarray]:
    images, labels, seconds = generate(pipe, num_images, args.seed, args.batch_size, guidance, steps)
    m = evaluate_digits(ImageSet.from_arrays(images, labels), extractor=extractor, with_precision_recall=False)
    row = {"setting": name, "accuracy": m["accuracy"], "fd": m["frechet_distance"],
           "fd_ratio": m["frechet_distance"] / baselines.full, "baseline_same_n": baselines.same_n(num_images),
           "seconds_per_image": seconds / num_images, "num_images": num_images,
           "per_class_accuracy": m["per_class_accuracy"]}
    return row, images, labels


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}\n")
    print("| setting | images | accuracy | FD | FD / baseline | real-vs-real FD, same n | time / image |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['setting']} | {r['num_images']} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | "
              f"{r['fd_ratio']:.2f} | {r['baseline_same_n']:.2f} | {r['seconds_per_image'] * 1000:.0f} ms |")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = args.model or str(bundled_digits_path())
    pipe = SphereARPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.vae.config.image_size
    guidance = float(pipe.transformer.config.guidance_scale)

    t0 = time.perf_counter()
    extractor = DigitFeatures(size)
    test_x, train_x = reference_images(size, "test"), reference_images(size, "train")
    test_out = extractor(test_x)
    real_acc = evaluate_digits(ImageSet.from_arrays(test_x, load_digit_splits().test_labels), extractor=extractor,
                               with_precision_recall=False)["accuracy"]
    baselines = Baselines(extractor(train_x)["features"], test_out["features"], args.seed)
    baseline = baselines.full
    print(f"model {model}: {size} px, recommended guidance {guidance:g}")
    print(f"classifier (MLP on {size} px gray, real train split, {time.perf_counter() - t0:.1f} s): "
          f"accuracy on the real test split {100 * real_acc:.1f}% ({len(test_x)} images)")
    print(f"baseline Fréchet distance real train ({len(train_x)}) vs real test ({len(test_x)}): {baseline:.3f}")
    results: dict = {"model": model, "image_size": size, "recommended_guidance": guidance,
                     "classifier_test_accuracy": real_acc, "baseline_fd": baseline}

    n = 10 * args.n_per_class
    default, images, labels = measure(f"guidance {guidance:g}, {args.default_steps} steps", pipe, extractor,
                                      baselines, n, args, guidance, args.default_steps)
    results["default"] = default
    print_table(f"default setting ({args.n_per_class} per class)", [default])
    print("\nper class: " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in default["per_class_accuracy"].items()))
    ok = default["accuracy"] >= 0.95 and default["fd"] <= 2 * baseline
    print(f"targets (accuracy >= 95%, FD <= 2x baseline = {2 * baseline:.2f}): {'met' if ok else 'NOT met'}")
    if args.grid:
        write_grid(images, labels, Path(args.grid), args.grid_cols)
        print(f"grid written to {args.grid}")

    if not args.no_sweep:
        n = 10 * args.sweep_n_per_class
        sweeps = {"guidance": [measure(f"guidance {g:g}, {args.default_steps} steps", pipe, extractor, baselines, n,
                                       args, g, args.default_steps)[0] for g in args.guidance_scales],
                  "steps": [measure(f"guidance {guidance:g}, {s} steps", pipe, extractor, baselines, n, args,
                                    guidance, s)[0] for s in args.steps]}
        print_table(f"guidance sweep ({args.sweep_n_per_class} per class)", sweeps["guidance"])
        print_table(f"steps sweep ({args.sweep_n_per_class} per class)", sweeps["steps"])
        results["sweeps"] = sweeps
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
