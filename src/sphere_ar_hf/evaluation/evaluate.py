"""``evaluate(GEN, REF)``: the metrics of ``sphere-ar evaluate`` for two image sets, in one feature space.

- ``features="inception"``: the ADM evaluator's metrics in torch-fidelity's TF-ported InceptionV3 (see
  :mod:`.inception`): FID (pool features), sFID (spatial features), Inception Score (of GEN), precision and recall
  (k = 3). A REF that stores ``mu`` / ``sigma`` (and ``mu_s`` / ``sigma_s``), as ADM reference batches do, uses
  those for FID (sFID); its images are still needed for precision and recall.
- ``features="digits"``: the bundled digits model's yardstick (:class:`.digits.DigitFeatures`): the Fréchet
  distance in the digit classifier's feature space, the classifier's accuracy on GEN's labels (when GEN has them),
  precision and recall there. REF defaults to the held-out real digits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..options import FEATURE_SPACES
from .image_sets import ImageSet
from .metrics import feature_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["FEATURE_SPACES", "evaluate", "evaluate_digits", "extract_features"]



def _image_set(source: str | os.PathLike | ImageSet) -> ImageSet:
    return source if isinstance(source, ImageSet) else ImageSet(source)


def extract_features(images: ImageSet, extractor: Callable[[np.ndarray], dict[str, np.ndarray]],
                     batch_size: int = 64, progress: bool = False, desc: str = "features") -> dict[str, np.ndarray]:
    """Run ``extractor`` over ``images`` in batches and concatenate each output."""
    from tqdm.auto import tqdm

    parts: dict[str, list[np.ndarray]] = {}
    with tqdm(total=images.num_images, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for batch in images.batches(batch_size):
            for key, value in extractor(batch).items():
                parts.setdefault(key, []).append(value)
            bar.update(len(batch))
    return {key: np.concatenate(value) for key, value in parts.items()}


def _statistics(features: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise ValueError(f"{what}: {len(features)} image(s); the covariance needs at least 2")
    return feature_statistics(features)


def _check_pair(gen: ImageSet, ref: ImageSet) -> None:
    if gen.num_images and ref.num_images and gen.image_shape != ref.image_shape:
        (gh, gw, _), (rh, rw, _) = gen.image_shape, ref.image_shape
        raise ValueError(f"GEN has {gw}x{gh} images, REF {rw}x{rh}: compare images of one size")


def evaluate(gen: str | os.PathLike | ImageSet, ref: str | os.PathLike | ImageSet | None = None,
             features: str = "inception", inception_weights: str | os.PathLike | None = None,
             device: str | torch.device = "cpu", batch_size: int = 64, k: int = 3, split_size: int = 5000,
             with_precision_recall: bool = True, progress: bool = False) -> dict[str, Any]:
    """The metrics of ``gen`` against ``ref`` (paths of ``.npz`` files or image folders, or :class:`ImageSet`)."""
    if features not in FEATURE_SPACES:
        raise ValueError(f"features must be one of {FEATURE_SPACES}, got {features!r}")
    if features == "digits" and inception_weights is not None:
        raise ValueError("inception_weights (--inception-weights) is used only with Inception features, not with "
                         "features='digits'")
    gen = _image_set(gen)
    if features == "digits":
        return evaluate_digits(gen, ref, batch_size=batch_size, k=k, with_precision_recall=with_precision_recall)
    if ref is None:
        raise ValueError("REF is required with Inception features (e.g. VIRTUAL_imagenet256_labeled.npz)")
    ref = _image_set(ref)
    _check_pair(gen, ref)
    if not gen.num_images and "mu" not in gen.statistics:
        raise ValueError(f"GEN {gen.path}: no images")
    if not ref.num_images and "mu" not in ref.statistics:
        raise ValueError(f"REF {ref.path}: no images")
    out: dict[str, Any] = {"features": "inception", "gen": str(gen.path), "ref": str(ref.path),
                           "num_gen": gen.num_images, "num_ref": ref.num_images}
    sets = {"GEN": gen, "REF": ref}
    need = {name: s.num_images > 0 and (with_precision_recall or name == "GEN" or "mu" not in s.statistics)
            for name, s in sets.items()}
    feats: dict[str, dict[str, np.ndarray]] = {}
    if any(need.values()):
        from .inception import InceptionFeatures

        network = InceptionFeatures(inception_weights, device)
        for name, s in sets.items():
            if need[name]:
                feats[name] = extract_features(s, network, batch_size, progress, desc=f"Inception features of {name}")
    stats = {}
    for name, s in sets.items():
        for key, suffix in (("pool", ""), ("spatial", "_s")):
            if f"mu{suffix}" in s.statistics and f"sigma{suffix}" in s.statistics:
                stats[name, key] = (s.statistics[f"mu{suffix}"], s.statistics[f"sigma{suffix}"])
            elif name in feats:
                stats[name, key] = _statistics(feats[name][key], f"{name} {s.path}")
    out["statistics"] = {name: "stored" if "mu" in s.statistics else "computed" for name, s in sets.items()}
    notes = [f"{name}: {len(f['pool'])} images for {f['pool'].shape[1]} features, a singular covariance (FID is "
             "biased upwards at small N; ADM uses 50,000 vs 10,000)" for name, f in feats.items()
             if len(f["pool"]) <= f["pool"].shape[1]]
    if with_precision_recall and not (gen.num_images and ref.num_images):
        notes.append("precision / recall need the images of both sets: skipped")
    out["fid"] = frechet_distance(*stats["GEN", "pool"], *stats["REF", "pool"])
    if ("GEN", "spatial") in stats and ("REF", "spatial") in stats:
        out["sfid"] = frechet_distance(*stats["GEN", "spatial"], *stats["REF", "spatial"])
    if "GEN" in feats:
        out["inception_score"] = inception_score(feats["GEN"]["probabilities"], split_size)
    if with_precision_recall and "GEN" in feats and "REF" in feats:
        out["precision"], out["recall"] = precision_recall(feats["REF"]["pool"], feats["GEN"]["pool"], k,
                                                           device=device)
    if notes:
        out["notes"] = notes
    return out


MAX_DIGITS_SIZE = 64  # the digits classifier is an MLP on size x size pixels, trained when it is first needed


def evaluate_digits(gen: str | os.PathLike | ImageSet, ref: str | os.PathLike | ImageSet | None = None,
                    extractor: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None, batch_size: int = 64,
                    k: int = 3, with_precision_recall: bool = True) -> dict[str, Any]:
    """``evaluate(features="digits")``: metrics in the feature space of ``extractor`` (default: a
    :class:`~sphere_ar_hf.evaluation.digits.DigitFeatures` trained at GEN's size); REF defaults to the held-out real
    digits."""
    from .digits import DigitFeatures, reference_images

    gen = _image_set(gen)
    if not gen.num_images:
        raise ValueError(f"GEN {gen.path}: no images")
    size = gen.image_shape[0]
    if size > MAX_DIGITS_SIZE:
        raise ValueError(f"GEN {gen.path}: {size}x{size} images; the digits feature space is for the digits model's "
                         f"small images, at most {MAX_DIGITS_SIZE} px (the real digits are 8x8 scans)")
    if ref is not None:
        ref = _image_set(ref)
        _check_pair(gen, ref)
        if not ref.num_images:
            raise ValueError(f"REF {ref.path}: no images")
        ref_images, ref_name = ref.images(), str(ref.path)
    else:
        ref_images, ref_name = reference_images(size), "digits: the held-out real test split"
    extractor = extractor or DigitFeatures(size)
    g = extract_features(gen, extractor, batch_size)
    r = extractor(ref_images)
    out: dict[str, Any] = {"features": "digits", "gen": str(gen.path), "ref": ref_name,
                           "num_gen": gen.num_images, "num_ref": len(ref_images)}
    out["frechet_distance"] = frechet_distance(*_statistics(g["features"], f"GEN {gen.path}"),
                                               *_statistics(r["features"], f"REF {ref_name}"))
    if gen.labels is not None:
        correct = g["predictions"] == gen.labels
        out["accuracy"] = float(np.mean(correct))
        out["per_class_accuracy"] = {int(c): float(np.mean(correct[gen.labels == c])) for c in np.unique(gen.labels)}
    if with_precision_recall:
        out["precision"], out["recall"] = precision_recall(r["features"], g["features"], k)
    return out
