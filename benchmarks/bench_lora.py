"""LoRA fine-tuning of the bundled digits model on a restyled copy of its training data, on CPU.

    python benchmarks/bench_lora.py                           # heavy-ink style, 300 steps, 50 images per class
    python benchmarks/bench_lora.py --style red --steps 300   # a colour the digits S-VAE cannot decode (see below)
    python benchmarks/bench_lora.py --model path/to/pipeline --json results.json

The train split of scikit-learn's digits (the split the base model was trained on, same preprocessing as
``sphere_ar_hf.evaluation.digits``: 16 px bilinear upscale) is restyled and written as a ``save_to_disk`` dataset;
a LoRA
adapter (rank 8 on the trunk's ``wqkv``/``wo``/``w1``/``w2``) is trained on it with ``examples/train_lora.py``'s
code (images encoded on the fly by the pipeline's frozen S-VAE). Printed:

* the adapter's size (values stored) and its ratio to the base transformer's parameters;
* training steps/s (optimizer steps over the ``Trainer.train`` wall time);
* the style score (mean ink, or the red excess for ``red``) of the real data (original, restyled) and of the
  S-VAE's reconstructions of the restyled real data (the most the frozen decoder can show);
* for generated images (base, adapted, merged): the mean ink, the red-channel excess ``mean(R - (G + B) / 2)``,
  and the accuracy of the digits classifier (``DigitClassifier``, trained on the real train split) on their
  grayscale version (are they still the requested digit?), next to its accuracy on the real test digits (original,
  restyled, reconstructed: what the style itself costs);
* merged vs adapter images for the same seed (max pixel difference), and that unloading the adapter restores the
  base weights bit for bit and the base images for the same seed.

Styles: ``heavy`` (intensity ** 0.4: faint stroke edges become bright, strokes look heavier), ``bold`` (3x3 max
filter at 16 px), ``dim`` (intensity x 0.5), ``red`` (strokes red instead of white). The bundled S-VAE was trained
on gray digits only and decodes every latent to gray (R = G = B up to 0.04), so a red style cannot show in any
sample of this pipeline whatever the AR model does: ``--style red`` demonstrates that (the adapter learns the
nearest gray it can decode). Numbers are measurements, not assertions (``tests/test_lora.py`` checks a small run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from transformers import TrainerCallback  # noqa: E402

from sphere_ar_hf import SphereARPipeline  # noqa: E402
from sphere_ar_hf.evaluation.digits import (  # noqa: E402
    DIGITS_ID2LABEL,
    DIGITS_IMAGE_SIZE,
    DigitClassifier,
    bundled_digits_path,
    generate_digits,
    load_digit_splits,
    upscale_digits,
)

STYLES = ("heavy", "bold", "dim", "red")


# ---------------------------------------------------------------------------------------------------------------
# the restyled data and the style scores (also used by tests/test_lora.py)


def restyle_digits(images: np.ndarray, style: str, size: int = DIGITS_IMAGE_SIZE) -> np.ndarray:
    """Digits (N, 8, 8) in 0..16 -> restyled RGB images (N, size, size, 3) float32 in [0, 1].

    The gray image is ``sphere_ar_hf.evaluation.digits.upscale_digits`` mapped to [0, 1] (0 is the black background).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    gray = torch.from_numpy((upscale_digits(images, size) + 1.0) / 2.0)[:, None]
    if style == "heavy":
        gray = gray.clamp(0, 1) ** 0.4
    elif style == "bold":
        gray = F.max_pool2d(gray, 3, stride=1, padding=1)
    elif style == "dim":
        gray = gray * 0.5
    rgb = gray.repeat(1, 3, 1, 1)
    if style == "red":
        rgb[:, 1:] = 0.0
    return rgb.permute(0, 2, 3, 1).clamp(0, 1).numpy().astype(np.float32)


def write_style_dataset(images: np.ndarray, labels: np.ndarray, style: str, path: str | Path,
                        size: int = DIGITS_IMAGE_SIZE) -> Path:
    """Write restyled digits as a ``save_to_disk`` dataset of RGB PNGs with a ClassLabel ``label`` ("0".."9")."""
    import datasets
    from PIL import Image

    pixels = np.rint(restyle_digits(images, style, size) * 255.0).astype(np.uint8)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[DIGITS_ID2LABEL[i] for i in range(10)])})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p) for p in pixels],
                                     "label": [int(y) for y in labels]}, features=features)
    ds.save_to_disk(str(path))
    return Path(path)


def style_score(images: np.ndarray, style: str) -> float:
    """How strongly NHWC images in [0, 1] show ``style``: the mean intensity (heavy, bold, dim: ink) or the mean
    red-channel excess (red)."""
    images = np.asarray(images, dtype=np.float64)
    if style == "red":
        return red_excess(images)
    return float(images.mean())


def red_excess(images: np.ndarray) -> float:
    """Mean of ``R - (G + B) / 2`` over NHWC images in [0, 1]."""
    images = np.asarray(images, dtype=np.float64)
    return float((images[..., 0] - (images[..., 1] + images[..., 2]) / 2).mean())


@torch.no_grad()
def reconstruct(pipe: Any, images: np.ndarray) -> np.ndarray:
    """The pipeline's S-VAE round trip (posterior mode) of NHWC images in [0, 1]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
    tokens = pipe.vae.normalize(pipe.vae.encode(x).latent_dist.mode())
    out = (pipe.vae.decode(tokens).sample / 2 + 0.5).clamp(0, 1)
    return out.permute(0, 2, 3, 1).numpy()


def weights_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    """True when ``module``'s state dict has exactly the snapshot's keys and bitwise equal tensors."""
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in snapshot)


class StepTimer(TrainerCallback):
    """Wall time of ``Trainer.train`` (train begin to end) and the optimizer steps it ran."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.steps = time.perf_counter(), 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


# ---------------------------------------------------------------------------------------------------------------
# the benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base pipeline folder (default: the bundled digits model)")
    p.add_argument("--style", choices=STYLES, default="heavy")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-head", action="store_true", help="also adapt the diffusion head")
    p.add_argument("--n-per-class", type=int, default=50, help="generated images per class and setting")
    p.add_argument("--inference-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a busy machine)")
    p.add_argument("--work-dir", type=Path, default=None, help="data and adapter (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    return p.parse_args(argv)


def train_adapter(model: str, data: Path, out: Path, args: argparse.Namespace) -> tuple[Path, StepTimer]:
    """``examples/train_lora.py``'s run, in process."""
    from sphere_ar_hf.training.data import DataArguments
    from sphere_ar_hf.training.lora import LoraArguments, LoraTrainingArguments, train_lora

    timer = StepTimer()
    adapter = train_lora(
        LoraArguments(pretrained_model=model, lora_rank=args.rank, lora_head=args.lora_head),
        DataArguments(dataset_path=str(data), aug_ratio=0.0, hflip=False, num_classes=10),
        LoraTrainingArguments(output_dir=str(out), use_cpu=True, seed=args.seed, max_steps=args.steps,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              min_lr=args.lr / 10, dataloader_num_workers=0, logging_steps=max(1, args.steps // 5),
                              disable_tqdm=True),
        callbacks=[timer])
    return adapter, timer


def main(argv: list[str] | None = None) -> dict:
    from threadpoolctl import threadpool_limits

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):  # scikit-learn's BLAS too (2 threads on a busy 2-core machine: 10x slower)
        results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def run(args: argparse.Namespace) -> dict:
    """Train, sample, measure; returns every number."""
    from sphere_ar_hf.lora import adapter_parameter_count, load_lora, merge_lora, unload_lora

    model = args.model or str(bundled_digits_path())
    tmp = tempfile.TemporaryDirectory(prefix="bench_lora-") if args.work_dir is None else None
    work = Path(tmp.name) if tmp else args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        splits = load_digit_splits()
        size = SphereARPipeline.from_pretrained(model).vae.config.image_size
        data = write_style_dataset(splits.train_images, splits.train_labels, args.style, work / f"data-{args.style}",
                                   size)
        adapter, timer = train_adapter(model, data, work / "run", args)

        pipe = SphereARPipeline.from_pretrained(model)
        pipe.set_progress_bar_config(disable=True)
        base_params = sum(p.numel() for p in pipe.transformer.parameters())
        clf = DigitClassifier.fit_real(splits, size=size)
        real = upscale_digits(splits.test_images, size)
        real_rgb = np.repeat(((real + 1) / 2)[..., None], 3, axis=-1)
        styled = restyle_digits(splits.test_images, args.style, size)
        reconstructed = reconstruct(pipe, styled)

        def sample() -> tuple[np.ndarray, np.ndarray, float]:
            return generate_digits(pipe, args.n_per_class, None, args.inference_steps, args.seed + 1)

        def measure(images: np.ndarray, labels: np.ndarray, seconds: float) -> dict:
            return {"style": style_score(images, args.style), "ink": float(np.mean(images)),
                    "red_excess": red_excess(images),
                    "accuracy": clf.accuracy(images, labels), "seconds_per_image": seconds / len(labels)}

        before = weights_snapshot(pipe.transformer)
        base_images, labels, secs = sample()
        rows = {"base": measure(base_images, labels, secs)}
        load_lora(pipe, adapter)
        adapter_values = adapter_parameter_count(pipe)
        lora_images, _, secs = sample()
        rows["adapted"] = measure(lora_images, labels, secs)
        unload_lora(pipe)
        unloaded_weights_equal = same_weights(pipe.transformer, before)
        unloaded_images_equal = bool(np.array_equal(sample()[0], base_images))
        load_lora(pipe, adapter)
        merge_lora(pipe)
        merged_images, _, secs = sample()
        rows["merged"] = measure(merged_images, labels, secs)
        merged_diff = float(np.abs(merged_images - lora_images).max())
        merged_same_class = float(np.mean(clf.predict(merged_images) == clf.predict(lora_images)))

        results = {
            "model": model, "style": args.style, "steps": args.steps, "batch_size": args.batch_size,
            "rank": args.rank, "lora_head": args.lora_head, "adapter_values": adapter_values,
            "base_parameters": base_params, "adapter_ratio": adapter_values / base_params,
            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
            "train_seconds": timer.seconds, "train_steps_per_second": timer.steps_per_second,
            "real_style": style_score(real_rgb, args.style), "real_restyled_style": style_score(styled, args.style),
            "vae_reconstruction_style": style_score(reconstructed, args.style),
            "classifier_real_test_accuracy": clf.accuracy(real, splits.test_labels),
            "classifier_restyled_test_accuracy": clf.accuracy(styled, splits.test_labels),
            "classifier_reconstructed_test_accuracy": clf.accuracy(reconstructed, splits.test_labels),
            "generated": rows, "merged_vs_adapter_max_pixel_diff": merged_diff,
            "merged_vs_adapter_same_class": merged_same_class,
            "unloaded_weights_bitwise_equal": unloaded_weights_equal,
            "unloaded_images_equal": unloaded_images_equal,
            "num_images": len(labels), "inference_steps": args.inference_steps, "seconds": time.perf_counter() - t0,
        }
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def report(r: dict) -> None:
    g = r["generated"]
    score = "red excess" if r["style"] == "red" else "mean ink"
    print(f"base model {r['model']}; style {r['style']!r}; rank {r['rank']}"
          f"{' + head' if r['lora_head'] else ''}; {r['steps']} steps of batch {r['batch_size']}")
    print(f"adapter: {r['adapter_values']:,} values ({r['adapter_bytes'] / 1024:.0f} KiB) = "
          f"{100 * r['adapter_ratio']:.2f}% of the base transformer's {r['base_parameters']:,} parameters")
    print(f"training: {r['train_steps_per_second']:.2f} steps/s ({r['train_seconds']:.0f} s)")
    print(f"\nstyle score ({score}) — real: original {r['real_style']:.3f}, restyled {r['real_restyled_style']:.3f}, "
          f"S-VAE reconstruction of the restyled {r['vae_reconstruction_style']:.3f}")
    print(f"classifier on the real test digits: original {100 * r['classifier_real_test_accuracy']:.1f}%, "
          f"restyled {100 * r['classifier_restyled_test_accuracy']:.1f}%, S-VAE reconstruction of the restyled "
          f"{100 * r['classifier_reconstructed_test_accuracy']:.1f}%")
    print(f"\n{r['num_images']} generated images per setting ({r['inference_steps']} steps, recommended guidance)\n")
    print("| setting | mean ink | red excess | classifier accuracy | time / image |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("base", "adapted", "merged"):
        row = g[name]
        print(f"| {name} | {row['ink']:.3f} | {row['red_excess']:+.4f} | {100 * row['accuracy']:.1f}% | "
              f"{1000 * row['seconds_per_image']:.0f} ms |")
    print(f"\nmerged vs adapter, same seed: max pixel difference {r['merged_vs_adapter_max_pixel_diff']:.2e}, "
          f"same predicted class {100 * r['merged_vs_adapter_same_class']:.0f}%")
    print(f"after unload_lora: weights bitwise equal to the base: {r['unloaded_weights_bitwise_equal']}; "
          f"same images as the base for the same seed: {r['unloaded_images_equal']}")
    print(f"total {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
