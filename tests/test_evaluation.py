"""sphere_ar_hf.evaluation: the metrics against closed forms, constructed point sets and restatements of the ADM
evaluator; the Inception path with a random network saved in the real weights' format; ``sphere-ar evaluate``."""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sphere_ar_hf.cli import main as cli
from sphere_ar_hf.evaluation import (
    ImageSet,
    evaluate,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    write_npz,
)
from sphere_ar_hf.evaluation.inception import InceptionFeatures, load_inception_weights

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T + (0 if rank else 0.1 * np.eye(d))


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli(args)
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_commuting() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))  # shared eigenvectors: sigma1 and sigma2 commute
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 3])  # full rank, and a singular sigma1 (fewer samples than dimensions)
def test_frechet_distance_closed_form_non_commuting(rank) -> None:
    # sigma2 = T sigma1 T with T symmetric positive definite: (sigma1^1/2 sigma2 sigma1^1/2)^1/2 = sigma1^1/2 T
    # sigma1^1/2, so the distance is |mu1 - mu2|^2 + tr(sigma1) + tr(T sigma1 T) - 2 tr(T sigma1)
    rng = np.random.default_rng(1)
    d = 8
    s1, t = _spd(d, rng, rank), _spd(d, rng)
    s2 = t @ s1 @ t
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(t @ s1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_and_constant_features() -> None:
    rng = np.random.default_rng(2)
    f = rng.standard_normal((50, 5))
    f[:, 2] = 3.0  # a constant feature: zero variance, a singular covariance
    mu, sigma = feature_statistics(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # two point masses: the distance is the squared distance of the means
    z = np.zeros((4, 4))
    assert frechet_distance(np.zeros(4), z, np.ones(4), z) == pytest.approx(4.0)


def test_frechet_distance_agrees_with_the_adm_formula() -> None:
    """The ADM evaluator's sqrtm of the product (scipy), where that is well conditioned."""
    from scipy import linalg

    rng = np.random.default_rng(3)
    mu1, mu2, s1, s2 = rng.standard_normal(16), rng.standard_normal(16), _spd(16, rng), _spd(16, rng)
    covmean = linalg.sqrtm(s1 @ s2).real
    adm = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(adm, rel=1e-9)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form() -> None:
    rng = np.random.default_rng(4)
    d = 3
    mu1, mu2, s1, s2 = np.zeros(d), np.full(d, 0.5), np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 1.0, 0.5])
    a = rng.multivariate_normal(mu1, s1, 200_000)
    b = rng.multivariate_normal(mu2, s2, 200_000)
    expected = 0.75 + 2 * (np.sqrt(2) - 1) ** 2
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(expected, abs=0.02)


def test_feature_statistics_and_frechet_distance_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="2-d"):
        feature_statistics(np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        feature_statistics(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="one length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="3x3"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- precision / recall


def _line(xs) -> np.ndarray:
    return np.stack([np.asarray(xs, dtype=np.float32), np.zeros(len(xs), np.float32)], axis=1)


def test_precision_recall_on_constructed_sets() -> None:
    real = _line(np.arange(100))  # spacing 1: k=3 radius 2 inside, 3 at both ends
    fake = _line(np.arange(50) + 0.5)  # inside the real manifold; its own balls reach real points 0..52
    assert precision_recall(real, fake, k=3) == (1.0, 0.53)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    far = _line(np.arange(50) + 1000.0)
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    radii = manifold_radii(real, k=3)
    assert radii[0] == 9.0 and radii[50] == 4.0  # squared distances to the 3rd neighbour


def _adm_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """The ADM evaluator's ManifoldEstimator, restated (float32 distances, np.partition at k)."""
    def dist(a, b):
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0)

    def radii(f):
        return np.partition(dist(f, f), k, axis=1)[:, k]

    r_real, r_fake = radii(real), radii(fake)
    d = dist(real, fake)  # (real, fake)
    precision = np.mean((d <= r_real[:, None]).any(axis=0))
    recall = np.mean((d <= r_fake[None, :]).any(axis=1))
    return float(precision), float(recall)


def test_precision_recall_matches_the_adm_evaluator_in_blocks() -> None:
    rng = np.random.default_rng(5)
    real = rng.standard_normal((300, 8)).astype(np.float32)
    fake = (rng.standard_normal((250, 8)) + 0.9).astype(np.float32)
    expected = _adm_precision_recall(real, fake)
    assert 0.05 < expected[0] < 0.95 and 0.05 < expected[1] < 0.95  # a case where the balls matter
    assert precision_recall(real, fake, batch_size=64) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="different dimensions"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((10, 2)), np.zeros((10, 2)), k=0)


# ----------------------------------------------------------------------------- Inception Score


def test_inception_score_known_values() -> None:
    eye = np.eye(10)
    assert inception_score(np.tile(eye, (30, 1))) == pytest.approx(10.0)  # confident and diverse: all classes
    assert inception_score(np.tile(eye[3], (50, 1))) == pytest.approx(1.0)  # one class only
    assert inception_score(np.full((40, 10), 0.1)) == pytest.approx(1.0)  # no confidence
    halves = np.concatenate([np.tile(eye[0], (20, 1)), np.tile(eye[1], (20, 1))])
    assert inception_score(halves, split_size=40) == pytest.approx(2.0)
    assert inception_score(halves, split_size=20) == pytest.approx(1.0)  # each split alone: one class
    with pytest.raises(ValueError, match="softmax"):
        inception_score(np.ones((4, 3)))


def test_inception_score_of_a_stand_in_classifier_agrees_with_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    g = torch.Generator().manual_seed(0)
    classifier = torch.nn.Linear(32, 20)
    with torch.no_grad():
        logits = classifier(torch.randn(600, 32, generator=g) * 3)
    ours = inception_score(torch.softmax(logits.double(), 1), split_size=200)
    theirs = isc_features_to_metric(logits, splits=3, shuffle=False)["inception_score_mean"]
    assert 1.5 < ours < 20 and ours == pytest.approx(theirs, rel=1e-9)


# ----------------------------------------------------------------------------- Inception features


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised torch-fidelity InceptionV3, saved as the real weights file is: a plain state dict."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    net = Unloaded("random", ["2048"], feature_extractor_weights_path=empty)
    for m in net.modules():  # batch norms calibrated on random images: features of a sane scale
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(_images(4, 64, seed=9)).permute(0, 3, 1, 2))
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_inception_features_from_a_weights_file(random_inception_weights) -> None:
    net = InceptionFeatures(random_inception_weights)
    out = net(_images(3))
    assert out["pool"].shape == (3, 2048) and out["spatial"].shape == (3, 17 * 17 * 7)
    assert out["probabilities"].shape == (3, 1008)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-9)
    assert np.isfinite(out["pool"]).all() and out["pool"].std() > 0 and out["spatial"].std() > 0
    # the spatial features are mixed_6/conv[..., :7] (Mixed_6d's 1x1 branch) in NHWC order
    seen = {}
    hook = net.network.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.clone()))
    again = net(_images(3))
    hook.remove()
    np.testing.assert_array_equal(again["spatial"], seen["x"][:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy())
    np.testing.assert_array_equal(again["pool"], out["pool"])


def test_inception_weights_refuse_code_and_wrong_files(tmp_path) -> None:
    class Boom:
        def __reduce__(self):
            return (exec, ("open('/tmp/sphere_ar_pwned', 'w').write('x')",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv.weight": Boom()}))
    Path("/tmp/sphere_ar_pwned").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="weights_only"):
        load_inception_weights(evil)
    assert not Path("/tmp/sphere_ar_pwned").exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="not torch-fidelity's InceptionV3"):
        InceptionFeatures(wrong)
    with pytest.raises(FileNotFoundError):
        load_inception_weights(tmp_path / "missing.pth")


def test_evaluate_with_inception_features(random_inception_weights, tmp_path, capsys) -> None:
    gen, ref = tmp_path / "gen.npz", tmp_path / "ref.npz"
    write_npz(gen, [(_images(6, seed=1), np.arange(6))], 6, (32, 32, 3))
    write_npz(ref, [(_images(7, seed=2), np.zeros(7))], 7, (32, 32, 3))
    code, out, err = _run_cli(["evaluate", str(gen), str(ref), "--inception-weights", str(random_inception_weights),
                               "--json", "--device", "cpu", "--batch-size", "4"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(result)
    assert result["num_gen"] == 6 and result["num_ref"] == 7 and result["statistics"]["REF"] == "computed"
    assert any("singular covariance" in note for note in result["notes"])
    # the same numbers from the features, through the public functions
    net = InceptionFeatures(random_inception_weights)
    g, r = net(_images(6, seed=1)), net(_images(7, seed=2))
    mu_g, sigma_g = feature_statistics(g["pool"])
    mu, sigma = feature_statistics(r["pool"])
    assert result["fid"] == pytest.approx(frechet_distance(mu_g, sigma_g, mu, sigma), rel=1e-6)
    assert result["inception_score"] == pytest.approx(inception_score(g["probabilities"]), rel=1e-6)
    assert (result["precision"], result["recall"]) == precision_recall(r["pool"], g["pool"])
    # a REF with stored statistics (an ADM reference batch) uses them: shifting its mean by 1 changes the FID by
    # exactly |mu_g - mu - 1|^2 - |mu_g - mu|^2
    shifted = tmp_path / "ref_stats.npz"
    np.savez(shifted, arr_0=_images(7, seed=2), mu=mu + 1.0, sigma=sigma, mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    stored = evaluate(gen, shifted, inception_weights=random_inception_weights, with_precision_recall=False)
    assert stored["statistics"]["REF"] == "stored"
    delta = ((mu_g - mu - 1.0) ** 2).sum() - ((mu_g - mu) ** 2).sum()
    assert stored["fid"] == pytest.approx(result["fid"] + delta, rel=1e-6)
    assert stored["sfid"] != pytest.approx(result["sfid"], rel=1e-3)


def test_evaluate_json_gives_the_closed_form_distance_of_gaussians(tmp_path, capsys) -> None:
    """Statistics-only .npz files (mu, sigma, as ADM reference batches store them): FID is the closed form."""
    rng = np.random.default_rng(6)
    d = 5
    s1, t = _spd(d, rng), _spd(d, rng)
    s2 = t @ s1 @ t
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=s1)
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=s2)
    code, out, err = _run_cli(["evaluate", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json"], capsys)
    assert code == 0, err
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(t @ s1)
    assert json.loads(out)["fid"] == pytest.approx(expected, rel=1e-9)
    code, out, _ = _run_cli(["evaluate", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], capsys)
    assert code == 0 and f"FID: {expected:.6g}" in out and "sFID" not in out and "Precision" not in out
    assert "note: precision / recall need the images of both sets" in out


def test_evaluate_errors(tmp_path, capsys) -> None:
    from PIL import Image

    small, big, empty, one = (tmp_path / n for n in ("small", "big", "empty", "one"))
    for folder, size, n in ((small, 16, 3), (big, 32, 3), (one, 16, 1)):
        folder.mkdir()
        for i, im in enumerate(_images(n, size)):
            Image.fromarray(im).save(folder / f"{i}.png")
    empty.mkdir()
    cases = [
        ([str(small), str(big), "--features", "digits"], "GEN has 16x16 images, REF 32x32"),
        ([str(empty), "--features", "digits"], "no images"),
        ([str(one), "--features", "digits"], "the covariance needs at least 2"),
        ([str(small), str(tmp_path / "nowhere.npz")], "no such file"),
        ([str(small)], "REF is required"),
    ]
    for args, needle in cases:
        code, _, err = _run_cli(["evaluate", *args], capsys)
        assert code == 2 and err.startswith("error:") and needle in err, (args, err)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_images(1, 16)[0]).save(mixed / "a.png")
    Image.fromarray(_images(1, 20)[0]).save(mixed / "b.png")
    code, _, err = _run_cli(["evaluate", str(mixed), "--features", "digits"], capsys)
    assert code == 2 and "images of different sizes" in err
    bad = tmp_path / "float.npz"
    np.savez(bad, arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(bad)


def test_image_set_reads_npz_and_folders_alike(tmp_path) -> None:
    from PIL import Image

    images = _images(5, 12)
    write_npz(tmp_path / "s.npz", [(images[:2], [0, 1]), (images[2:], [2, 3, 4])], 5, (12, 12, 3))
    folder = tmp_path / "png"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    a, b = ImageSet(tmp_path / "s.npz"), ImageSet(folder)
    assert a.num_images == b.num_images == 5 and a.image_shape == b.image_shape == (12, 12, 3)
    np.testing.assert_array_equal(np.concatenate(list(a.batches(2))), images)
    np.testing.assert_array_equal(b.images(), images)
    np.testing.assert_array_equal(a.labels, np.arange(5))
    with np.load(tmp_path / "s.npz") as z:  # a plain np.load reads it, as the ADM evaluator does
        np.testing.assert_array_equal(z["arr_0"], images)


# ----------------------------------------------------------------------------- digits features


def _load_eval_digits():
    spec = importlib.util.spec_from_file_location("eval_digits", ROOT / "benchmarks" / "eval_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_metric_of_sample_and_evaluate_agrees_with_eval_digits(tmp_path, capsys) -> None:
    out = tmp_path / "samples"
    code, _, err = _run_cli(["sample", "--num-images", "40", "--output-dir", str(out), "--labels", "balanced",
                             "--seed", "3", "--steps", "8", "--batch-size", "16", "--device", "cpu"], capsys)
    assert code == 0, err
    code, text, err = _run_cli(["evaluate", str(out / "samples.npz"), "--features", "digits", "--json"], capsys)
    assert code == 0, err
    cli_result = json.loads(text)
    bench = _load_eval_digits().main(["--n-per-class", "4", "--no-sweep", "--grid", "", "--default-steps", "8",
                                      "--seed", "3", "--batch-size", "16"])
    capsys.readouterr()
    assert cli_result["frechet_distance"] == bench["default"]["fd"]
    assert cli_result["accuracy"] == bench["default"]["accuracy"]
    assert cli_result["num_ref"] == 360 and cli_result["accuracy"] >= 0.8
    # a folder of the same images (--png) gives the same numbers
    code, _, err = _run_cli(["sample", "--num-images", "40", "--output-dir", str(tmp_path / "png"), "--labels",
                             "balanced", "--seed", "3", "--steps", "8", "--batch-size", "16", "--png"], capsys)
    assert code == 0, err
    folder = evaluate(tmp_path / "png" / "images", features="digits")
    assert folder["frechet_distance"] == cli_result["frechet_distance"] and "accuracy" not in folder
