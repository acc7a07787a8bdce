"""`sphere-ar evaluate` refuses bad inputs in one line: stored statistics that are no covariance (a negative FID
used to be printed), an empty or zero-byte `.npz`, images of 0x0 pixels, a text file as Inception weights, and
Inception weights with the digits feature space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sphere_ar_hf.evaluation.metrics import covariance_problem, frechet_distance
from test_cli import error_line, run


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    np.savez(d / "ok.npz", arr_0=rng.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8))
    np.savez(d / "empty.npz")
    (d / "zero_bytes.npz").write_bytes(b"")
    np.savez(d / "zero_pixels.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8))
    a = rng.standard_normal((8, 8))
    np.savez(d / "negative_sigma.npz", mu=np.zeros(8), sigma=-(a @ a.T))
    np.savez(d / "asymmetric_sigma.npz", mu=np.zeros(8), sigma=a @ a.T + np.triu(np.ones((8, 8))))
    np.savez(d / "mismatched.npz", mu=np.zeros(7), sigma=a @ a.T)
    np.savez(d / "mu_only.npz", mu=np.zeros(8))
    (d / "weights.txt").write_text("hello")
    return d


@pytest.mark.parametrize(("args", "needles"), [
    (["empty.npz", "ok.npz"], ["empty.npz", "no images (arr_0) and no statistics"]),
    (["zero_bytes.npz", "ok.npz"], ["zero_bytes.npz", "not a readable .npz file"]),
    (["zero_pixels.npz", "ok.npz"], ["zero_pixels.npz", "at least 1x1 pixels", "(4, 0, 0, 3)"]),
    (["ok.npz", "negative_sigma.npz"], ["negative_sigma.npz", "sigma is not a covariance", "positive semi-definite"]),
    (["ok.npz", "asymmetric_sigma.npz"], ["asymmetric_sigma.npz", "not symmetric"]),
    (["ok.npz", "mismatched.npz"], ["mismatched.npz", "for a mean of length 7"]),
    (["ok.npz", "mu_only.npz"], ["mu_only.npz", "mu and sigma come together"]),
    (["ok.npz", "ok.npz", "--inception-weights", "weights.txt"], ["weights.txt", "not a readable torch weights"]),
    (["ok.npz", "--features", "digits", "--inception-weights", "weights.txt"], ["only with Inception features"]),
])
def test_evaluate_refuses_bad_inputs_in_one_line(files, args, needles, monkeypatch) -> None:
    monkeypatch.chdir(files)
    code, out, err = run("evaluate", *args)
    assert code == 2, err
    line = error_line(err)
    for needle in needles:
        assert needle in line, (needle, line)
    assert "fid" not in out.lower()


def test_frechet_distance_refuses_a_matrix_that_is_no_covariance() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 6))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert covariance_problem(sigma) is None and frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    singular = np.cov(x[:3], rowvar=False)  # fewer samples than dimensions: singular, still a covariance
    assert covariance_problem(singular) is None
    with pytest.raises(ValueError, match="sigma2 is not a covariance matrix: not positive semi-definite"):
        frechet_distance(mu, sigma, mu, -sigma)
    with pytest.raises(ValueError, match="sigma1 is not a covariance matrix: it contains NaN"):
        frechet_distance(mu, np.full((6, 6), np.nan), mu, sigma)
