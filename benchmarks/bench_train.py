"""AR training throughput on CPU (fp32): on-the-fly S-VAE encoding vs the latent cache, and data loading.

    python benchmarks/bench_train.py                       # tiny and SphereAR-B sizes
    python benchmarks/bench_train.py --sizes tiny --threads 1

For each size it prints:

* training samples/s of one optimizer step (``SphereARTrainer.compute_loss`` + backward + clipping + AdamW +
  the EMA update) on batches prepared in advance, fed either as ``pixel_values`` (encoded by the frozen S-VAE
  with posterior sampling inside the step) or as ``latents`` (what the latent cache yields);
* data-loading items/s of one worker (the main process, no DataLoader): decode + the official augmentation
  (``ImageDataset``) vs reading + posterior sampling (``LatentCacheDataset``).

Sizes: ``tiny`` (32 px, 4 tokens, the test model and test S-VAE) and ``B`` (256 px, 256 tokens, SphereAR-B and
the official 75M S-VAE, random weights, small batch and few steps). Images are synthetic JPEGs of 500x375 (the
ImageNet median) for ``B`` and 40x44 for ``tiny``; the cache is written by ``cache_latents``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from sphere_ar_hf import SphereARConfig, SphereARTransformer, SphereVAE  # noqa: E402
from sphere_ar_hf.training.arguments import SphereARTrainingArguments  # noqa: E402
from sphere_ar_hf.training.data import DataArguments, build_image_dataset  # noqa: E402
from sphere_ar_hf.training.ema import ParameterEMA  # noqa: E402
from sphere_ar_hf.training.latent_cache import LatentCacheDataset, cache_latents  # noqa: E402
from sphere_ar_hf.training.trainer import SphereARTrainer  # noqa: E402

TINY_AR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_hidden_size=64, head_num_layers=2,
               head_num_adaln=1, num_class_tokens=4)
TINY_VAE = dict(patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1, decoder_layers=1)
SIZES = {
    "tiny": dict(image_size=32, ar=TINY_AR, vae=TINY_VAE, image_shape=(40, 44), batch=16, steps=20, items=200),
    "B": dict(image_size=256, ar=None, vae={}, image_shape=(375, 500), batch=2, steps=2, items=40),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,B", help="comma-separated subset of: tiny, B (default: both)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=None, help="override the per-size training batch")
    ap.add_argument("--steps", type=int, default=None, help="override the per-size number of timed steps")
    ap.add_argument("--items", type=int, default=None, help="override the per-size number of loaded items")
    return ap.parse_args(argv)


def synthetic_jpegs(n: int, shape: tuple[int, int], num_classes: int = 10):
    """A ``datasets.Dataset`` of ``n`` smooth random JPEG images with ClassLabel labels."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    rows = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        img = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + i) for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        rows.append({"bytes": buf.getvalue(), "path": None})
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])})
    return datasets.Dataset.from_dict({"image": rows, "label": [i % num_classes for i in range(n)]},
                                      features=features)


def time_training(model: SphereARTransformer, vae: SphereVAE, batch: int, steps: int, tmp: Path,
                  source: str) -> float:
    """Samples/s of full optimizer steps on prepared ``pixel_values`` or ``latents`` batches."""
    c = model.config
    args = SphereARTrainingArguments(output_dir=str(tmp / "out"), use_cpu=True, report_to="none",
                                     disable_tqdm=True, warmup_steps=0, ema_decay=0.0)
    trainer = SphereARTrainer(model=model, args=args, vae=vae)
    opt = trainer.create_optimizer()
    ema = ParameterEMA(model, 0.9999)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c.num_classes, (batch,), generator=g)
    if source == "pixels":
        inputs = {"pixel_values": torch.rand(batch, 3, c.image_size, c.image_size, generator=g) * 2 - 1,
                  "class_labels": labels}
    else:
        x = torch.randn(batch, c.num_image_tokens, c.latent_dim, generator=g)
        inputs = {"latents": vae.normalize(x), "class_labels": labels}
    model.train()

    def step() -> None:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def time_loading(dataset, n: int) -> float:
    """Items/s of ``dataset[i]`` in this process (= one DataLoader worker)."""
    dataset.set_epoch(0)
    dataset[0]
    start = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    return n / (time.perf_counter() - start)


def bench_size(name: str, spec: dict, args: argparse.Namespace) -> None:
    batch, steps, items = args.batch or spec["batch"], args.steps or spec["steps"], args.items or spec["items"]
    size = spec["image_size"]
    torch.manual_seed(0)
    vae = SphereVAE(image_size=size, **spec["vae"]).eval()
    config = (SphereARConfig(image_size=size, num_classes=10, **spec["ar"]) if spec["ar"]
              else SphereARConfig.from_preset("SphereAR-B", image_size=size, num_classes=1000))
    model = SphereARTransformer(config)
    n_ar = sum(p.numel() for p in model.parameters()) / 1e6
    n_vae = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f"\n[{name}] {size} px, {config.num_image_tokens} tokens x {config.latent_dim}, AR {n_ar:.1f}M params, "
          f"S-VAE {n_vae:.1f}M params, batch {batch}, {steps} timed steps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for source, label in (("pixels", "on-the-fly encoding"), ("latents", "latent cache")):
            sps = time_training(model, vae, batch, steps, tmp, source)
            print(f"  train  {label:<22s} {sps:9.2f} samples/s  ({batch / sps:.3f} s/step)")
        n_images = min(items, 64)
        synthetic_jpegs(n_images, spec["image_shape"]).save_to_disk(str(tmp / "images"))
        data_args = DataArguments(dataset_path=str(tmp / "images"), resolution=size, num_classes=10)
        images = build_image_dataset(data_args, seed=0)
        # the cache's read cost does not depend on the encoder: write it with a small S-VAE of the same grid
        small = SphereVAE(image_size=size, **TINY_VAE).eval()
        cache_latents(small, data_args, tmp / "cache", batch_size=16)
        cache = LatentCacheDataset(tmp / "cache", seed=0)
        print(f"  load   {'decode + augment':<22s} {time_loading(images, items):9.1f} images/s per worker")
        print(f"  load   {'latent cache':<22s} {time_loading(cache, items):9.1f} items/s per worker")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32")
    for name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        if name not in SIZES:
            raise SystemExit(f"unknown size {name!r}; choose from {sorted(SIZES)}")
        bench_size(name, SIZES[name], args)


if __name__ == "__main__":
    main()
