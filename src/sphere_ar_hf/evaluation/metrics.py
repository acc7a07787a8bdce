"""Sample-quality metrics on feature sets, with the ADM evaluator's conventions (NumPy / torch, no TensorFlow).

- :func:`feature_statistics` and :func:`frechet_distance`: FID (and sFID, on spatial features) from the mean and
  covariance of two feature sets;
- :func:`inception_score`: the Inception Score of class probabilities, averaged over splits of 5,000 as ADM does;
- :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019) with k = 3 nearest neighbours.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_statistics", "frechet_distance", "inception_score", "manifold_radii", "precision_recall"]


def _features(features: np.ndarray | torch.Tensor, name: str = "features", min_rows: int = 1) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    f = np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (samples, dims), got shape {f.shape}")
    if len(f) < min_rows:
        raise ValueError(f"{name}: need at least {min_rows} samples, got {len(f)}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return f


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The mean ``(d,)`` and the unbiased covariance ``(d, d)`` (float64) of ``features`` ``(N, d)``, N >= 2."""
    f = _features(features, min_rows=2).astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def covariance_problem(sigma: np.ndarray) -> str | None:
    """Why ``sigma`` is not a covariance matrix (square, finite, symmetric, positive semi-definite up to rounding:
    no eigenvalue below -1e-4 of the largest), or None."""
    sigma = np.asarray(sigma, np.float64)
    if sigma.ndim != 2 or sigma.shape[0] != sigma.shape[1]:
        return f"not a square matrix (shape {sigma.shape})"
    if not np.isfinite(sigma).all():
        return "it contains NaN or infinite values"
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    if np.abs(sigma - sigma.T).max(initial=0.0) > 1e-4 * scale:
        return "not symmetric"
    w = np.linalg.eigvalsh(sigma) if sigma.size else np.zeros(0)
    if w.size and w.min() < -1e-4 * max(abs(w).max(), 1e-300):
        return f"not positive semi-definite (smallest eigenvalue {w.min():.4g}, largest {w.max():.4g})"
    return None


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)``.

    The trace of the matrix square root is taken from symmetric eigendecompositions (float64): ``sigma1^1/2`` from
    ``eigh(sigma1)`` and then the eigenvalues of the symmetric PSD matrix ``sigma1^1/2 sigma2 sigma1^1/2``, whose
    square roots sum to ``tr((sigma1 sigma2)^1/2)``. Eigenvalues that rounding makes slightly negative are clipped to
    zero, so singular and near-singular covariances (fewer samples than dimensions, constant features) need no
    special case: the ADM evaluator takes ``scipy.linalg.sqrtm`` of the non-symmetric product instead, which can
    return non-finite or complex values there, and then retries with 1e-6 added to both diagonals. Where both work
    they agree to ~1e-9 relative (tested, also for rank-deficient covariances against the closed form).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"the means must be vectors of one length, got shapes {mu1.shape} and {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"the covariances must be {d}x{d} matrices for means of length {d}, got shapes "
                         f"{s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    for name, a in (("sigma1", s1), ("sigma2", s2)):
        why = covariance_problem(a)
        if why is not None:
            raise ValueError(f"{name} is not a covariance matrix: {why}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root1 @ s2 @ root1
    trace_cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_cross)


def inception_score(probabilities: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))`` of class probabilities ``(N, classes)``, computed on consecutive splits of
    ``split_size`` rows and averaged (ADM: 5,000, i.e. 10 splits of 50,000 samples)."""
    p = _features(probabilities, "probabilities").astype(np.float64)
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probabilities must be non-negative rows that sum to 1 (apply a softmax to logits first)")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # p log(p / marginal), with 0 log 0 = 0 (the marginal is > 0 wherever p is)
        ratio = np.divide(part, marginal, out=np.ones_like(part), where=part > 0)
        scores.append(np.exp(np.mean(np.sum(part * np.log(ratio), axis=1))))
    return float(np.mean(scores))


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``|a|^2 - 2 a.b + |b|^2``, clamped at 0 (float32, as ADM)."""
    return (a.square().sum(1, keepdim=True) - 2.0 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0.0)


def _as_tensor(features: np.ndarray | torch.Tensor, name: str, min_rows: int, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(_features(features, name, min_rows), dtype=np.float32)).to(device)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = 3, batch_size: int = 1024,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Each sample's squared distance to its k-th nearest neighbour in ``features`` (itself excluded)."""
    return _radii(_as_tensor(features, "features", k + 1, device), k, batch_size)


def _radii(f: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    # the (k + 1)-th smallest distance of each row: the k-th neighbour after the sample itself (distance 0)
    return torch.cat([_squared_distances(f[i:i + batch_size], f).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(f), batch_size)])


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """The fraction of ``points`` inside at least one ball (``centers``, squared ``radii``)."""
    inside = [(_squared_distances(points[i:i + batch_size], centers) <= radii[None]).any(dim=1)
              for i in range(0, len(points), batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 1024, device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator computes them.

    Each set's manifold is the union of balls around its samples with the radius to the k-th nearest neighbour.
    Precision: the fraction of fake samples inside the real manifold; recall: the fraction of real samples inside
    the fake manifold. Distances in float32 (the ADM evaluator computes them in float16 where that does not
    overflow), ``batch_size`` rows at a time.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    real = _as_tensor(real_features, "real features", k + 1, device)
    fake = _as_tensor(fake_features, "fake features", k + 1, device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"the feature sets have different dimensions: {real.shape[1]} and {fake.shape[1]}")
    precision = _coverage(fake, real, _radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _radii(fake, k, batch_size), batch_size)
    return precision, recall
