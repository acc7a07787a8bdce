"""Evaluation at scale: sampling to ADM ``.npz`` files (``sphere-ar sample``) and FID / sFID / IS / precision /
recall (``sphere-ar evaluate``), without TensorFlow.

The metric functions need NumPy and torch only; Inception features need torch-fidelity (``[eval]`` extra).
"""

from .evaluate import FEATURE_SPACES, evaluate, evaluate_digits, extract_features
from .image_sets import ImageSet, write_npz
from .metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, precision_recall
from .sampling import (
    LABEL_MODES,
    ROW_QUANTUM,
    SamplingSettings,
    image_labels,
    image_seeds,
    run_sampling,
    sample_images,
    to_uint8,
)

__all__ = [
    "FEATURE_SPACES",
    "ImageSet",
    "LABEL_MODES",
    "ROW_QUANTUM",
    "SamplingSettings",
    "evaluate",
    "evaluate_digits",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "image_labels",
    "image_seeds",
    "inception_score",
    "manifold_radii",
    "precision_recall",
    "run_sampling",
    "sample_images",
    "to_uint8",
    "write_npz",
]
