"""The paper's ablation as options of the real models: the Gaussian posterior, ``normalize_decoder_input`` and
``normalize_tokens`` through training, the latent cache, sampling and save/load; both ablation benchmarks end to end
on a tiny setting."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_AR, TINY_VAE, randomize_zero_params
from sphere_ar_hf import SphereARConfig, SphereARPipeline, SphereARScheduler, SphereARTransformer, SphereVAE
from sphere_ar_hf.diagonal_gaussian import DiagonalGaussianDistribution
from sphere_ar_hf.evaluation.digits import load_digit_splits, write_digits_dataset
from sphere_ar_hf.training import DataArguments, LatentCacheDataset, cache_latents, load_latent_cache_info
from sphere_ar_hf.training.arguments import SphereARTrainingArguments
from sphere_ar_hf.training.data import center_crop, decode_image, pixels_to_tensor
from sphere_ar_hf.training.latent_cache import check_latent_cache
from sphere_ar_hf.training.trainer import SphereARTrainer
from sphere_ar_hf.training.vae_trainer import DEFAULT_KL_WEIGHTS, VAETrainingArguments, kl_weight

pytestmark = pytest.mark.usefixtures("one_thread")

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
RADIUS = math.sqrt(16)
VAE_OPTIONS = [("gaussian", False), ("gaussian", True), ("power_spherical", True)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=_gen(seed)) * 2 - 1


# ---- the Gaussian posterior --------------------------------------------------------------------------------------


def test_diagonal_gaussian_matches_torch_distributions() -> None:
    mean = torch.randn(3, 4, 16, generator=_gen(0))
    logvar = torch.randn(3, 4, 16, generator=_gen(1))
    dist = DiagonalGaussianDistribution(mean, logvar)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(ref, torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(dist.kl(), kl)
    assert dist.kl().shape == (3, 4)  # one value per token, as the Power Spherical's
    assert torch.equal(dist.mode(), mean)
    # reparameterised, from the explicit generator only
    assert torch.equal(dist.sample(_gen(5)), mean + torch.exp(0.5 * logvar) * torch.randn(3, 4, 16, generator=_gen(5)))
    many = DiagonalGaussianDistribution(mean[:1, :1].expand(20000, 1, 16), logvar[:1, :1].expand(20000, 1, 16))
    draws = many.sample(_gen(2))
    torch.testing.assert_close(draws.mean(0), mean[0, :1], atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.exp(0.5 * logvar[0, :1]), atol=0.05, rtol=0.02)
    again = DiagonalGaussianDistribution.from_parameters(dist.parameters())
    assert torch.equal(again.sample(_gen(3)), dist.sample(_gen(3)))
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussianDistribution(mean, logvar[..., :8])


@torch.no_grad()
def test_gaussian_vae_encodes_a_gaussian_and_decodes_its_draws_as_they_are(make_vae) -> None:
    vae = make_vae(posterior="gaussian", normalize_decoder_input=False)
    assert vae.quant_proj.out_features == 2 * 16  # a mean and a log-variance per dimension
    dist = vae.encode(_images()).latent_dist
    assert isinstance(dist, DiagonalGaussianDistribution) and dist.mean.shape == (3, 4, 16)
    x = torch.randn(2, 4, 16, generator=_gen(0))
    assert not torch.allclose(vae.decode(x).sample, vae.decode(3 * x).sample, atol=1e-3)  # no projection
    assert torch.equal(vae(_images(), generator=_gen(1)).sample, vae(_images(), generator=_gen(1)).sample)
    # the AR tokens are the draws, unless normalize_tokens projects them
    z = dist.sample(_gen(2))
    assert torch.equal(vae.tokens(z, normalize=False), z)
    torch.testing.assert_close(vae.tokens(z).norm(dim=-1), torch.full((3, 4), RADIUS))
    # with normalize_decoder_input the decoder sees only directions: any positive scale decodes the same
    projected = make_vae(posterior="gaussian", normalize_decoder_input=True)
    torch.testing.assert_close(projected.decode(x).sample, projected.decode(3 * x).sample, atol=1e-5, rtol=0)
    sphere = make_vae()
    torch.testing.assert_close(sphere.decode(x).sample, sphere.decode(3 * x).sample, atol=1e-5, rtol=0)
    # a Power Spherical draw is a unit direction: its tokens are on the radius-4 sphere even with normalize off
    unit = sphere.encode(_images()).latent_dist.sample(_gen(0))
    torch.testing.assert_close(sphere.tokens(unit, normalize=False).norm(dim=-1), torch.full((3, 4), RADIUS))


@pytest.mark.parametrize(("posterior", "normalize_decoder_input"), VAE_OPTIONS)
@torch.no_grad()
def test_vae_options_round_trip(make_vae, tmp_path: Path, posterior: str, normalize_decoder_input: bool) -> None:
    vae = make_vae(posterior=posterior, normalize_decoder_input=normalize_decoder_input)
    vae.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert (config["posterior"], config["normalize_decoder_input"]) == (posterior, normalize_decoder_input)
    loaded = SphereVAE.from_pretrained(tmp_path / "vae").eval()
    assert (loaded.config.posterior, loaded.config.normalize_decoder_input) == (posterior, normalize_decoder_input)
    x = torch.randn(2, 4, 16, generator=_gen(0)) * 2
    assert torch.equal(loaded.decode(x).sample, vae.decode(x).sample)
    for name, value in vae.encode(_images()).latent_dist.parameters().items():
        assert torch.equal(loaded.encode(_images()).latent_dist.parameters()[name], value)


def test_a_config_that_names_another_posterior_is_refused(make_vae, tmp_path: Path) -> None:
    make_vae(posterior="gaussian").save_pretrained(tmp_path / "vae")
    config = tmp_path / "vae" / "config.json"
    config.write_text(config.read_text().replace('"gaussian"', '"power_spherical"'))
    # the record saved with the weights names the edit; without it, strict loading finds quant_proj mis-shaped
    with pytest.raises(ValueError, match="posterior is 'power_spherical' but the weights were saved with "
                                         "posterior='gaussian'"):
        SphereVAE.from_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as a folder written before the record
    with pytest.raises(ValueError, match=r"quant_proj"):  # mis-shaped, never re-initialised
        SphereVAE.from_pretrained(tmp_path / "vae")


def test_vae_option_validation() -> None:
    with pytest.raises(ValueError, match="posterior must be one of 'power_spherical', 'gaussian'"):
        SphereVAE(**TINY_VAE, posterior="vmf")
    with pytest.raises(ValueError, match="normalize_decoder_input=False needs posterior='gaussian'"):
        SphereVAE(**TINY_VAE, normalize_decoder_input=False)
    with pytest.raises(ValueError, match="normalize_decoder_input: must be bool"):
        SphereVAE(**TINY_VAE, normalize_decoder_input="yes")


def test_kl_weight_defaults_per_posterior(make_vae) -> None:
    args = VAETrainingArguments(output_dir="x")
    assert args.kl_weight is None
    assert kl_weight(args, make_vae()) == 0.004 == DEFAULT_KL_WEIGHTS["power_spherical"]  # official
    assert kl_weight(args, make_vae(posterior="gaussian")) == DEFAULT_KL_WEIGHTS["gaussian"] == 1e-3
    assert kl_weight(VAETrainingArguments(output_dir="x", kl_weight=0.5), make_vae(posterior="gaussian")) == 0.5


# ---- latent cache and trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = load_digit_splits()
    path = tmp_path_factory.mktemp("digits") / "data"
    write_digits_dataset(splits.train_images[:12], splits.train_labels[:12], path, 32)
    return path


@torch.no_grad()
def test_gaussian_latent_cache_holds_means_and_log_variances(make_vae, digits32: Path, tmp_path: Path) -> None:
    vae = make_vae(posterior="gaussian", normalize_decoder_input=False)
    data_args = DataArguments(dataset_path=str(digits32), resolution=32, aug_ratio=0.0, hflip=False)
    cache = cache_latents(vae, data_args, tmp_path / "cache", batch_size=5, disable_tqdm=True)
    assert load_latent_cache_info(cache)["posterior"] == "gaussian"
    rows = datasets.load_from_disk(str(cache)).with_format("torch")[:]
    assert {"mean", "logvar", "mean_flip", "logvar_flip"} <= set(rows) and "mu" not in rows
    images = torch.stack([pixels_to_tensor(center_crop(decode_image(im), 32))
                          for im in datasets.load_from_disk(str(digits32))["image"]])
    dist = vae.encode(images).latent_dist
    torch.testing.assert_close(rows["mean"], dist.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(rows["logvar"], dist.logvar, atol=1e-5, rtol=0)
    # the items follow the AR model's normalize_tokens: the raw means, or projected onto the sphere
    raw = LatentCacheDataset(cache, hflip=False, sample_posterior=False, normalize=False)
    torch.testing.assert_close(torch.stack([raw[i]["latents"] for i in range(12)]), rows["mean"])
    projected = LatentCacheDataset(cache, hflip=False, normalize=True)
    norms = torch.stack([projected[i]["latents"] for i in range(12)]).norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((12, 4), RADIUS))
    drawn = torch.stack([LatentCacheDataset(cache, hflip=False, normalize=False)[i]["latents"] for i in range(12)])
    assert (drawn.norm(dim=-1) - RADIUS).abs().max() > 0.1 and not torch.allclose(drawn, rows["mean"])
    # a cache of one posterior does not train an AR model over a VAE of the other
    with pytest.raises(ValueError, match="holds gaussian posteriors, the VAE has a power_spherical posterior"):
        check_latent_cache(str(cache), make_vae())
    assert check_latent_cache(str(cache), vae)["num_examples"] == 12


@pytest.mark.parametrize("normalize_tokens", [True, False])
@torch.no_grad()
def test_trainer_encodes_images_as_the_model_expects(make_vae, tmp_path: Path, normalize_tokens: bool) -> None:
    torch.manual_seed(0)
    model = SphereARTransformer(SphereARConfig(**TINY_AR, normalize_tokens=normalize_tokens))
    args = SphereARTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1)
    trainer = SphereARTrainer(model=model, args=args, vae=make_vae(posterior="gaussian"))
    norms = trainer.encode_images(_images(), _gen(0)).norm(dim=-1)
    if normalize_tokens:
        torch.testing.assert_close(norms, torch.full((3, 4), RADIUS))
    else:
        assert (norms - RADIUS).abs().max() > 0.1


# ---- sampling and the command line -------------------------------------------------------------------------------


def _pipeline(normalize_tokens: bool, posterior: str = "gaussian", normalize_decoder_input: bool = False):
    torch.manual_seed(0)
    transformer = randomize_zero_params(SphereARTransformer(SphereARConfig(**TINY_AR,
                                                                           normalize_tokens=normalize_tokens)))
    vae = SphereVAE(**TINY_VAE, posterior=posterior, normalize_decoder_input=normalize_decoder_input)
    pipe = SphereARPipeline(transformer=transformer.eval(), vae=vae.eval(),
                            scheduler=SphereARScheduler(num_inference_steps=4))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_gaussian_pipeline_round_trips_and_samples_the_same(tmp_path: Path) -> None:
    pipe = _pipeline(normalize_tokens=False)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SphereARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.config.normalize_tokens is False
    assert (loaded.vae.config.posterior, loaded.vae.config.normalize_decoder_input) == ("gaussian", False)
    kw = dict(guidance_scale=3.0, num_inference_steps=4)
    a = pipe([1, 2], generator=_gen(0), output_type="pt", **kw).images
    assert torch.equal(a, loaded([1, 2], generator=_gen(0), output_type="pt", **kw).images)
    tokens = loaded([1, 2], generator=_gen(0), output_type="latent", **kw).images
    assert (tokens.norm(dim=-1) - RADIUS).abs().max() > 0.1  # no projection anywhere


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


TINY_RECIPE = ["--vae_epochs", "1", "--ar_epochs", "1", "--hidden_size", "32", "--layers", "1", "--heads", "2",
               "--head_hidden_size", "32", "--head_layers", "1", "--vae_layers", "1", "--vae_heads", "1",
               "--ar_warmup_steps", "5", "--ar_workers", "0"]


def test_the_command_line_trains_and_samples_the_gaussian_baseline(tmp_path: Path) -> None:
    out = tmp_path / "gaussian"
    done = _cli(str(ROOT / "examples" / "train_digits.py"), "--output_dir", str(out), "--posterior", "gaussian",
                "--no-normalize_decoder_input", "--no-normalize_tokens", *TINY_RECIPE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert (vae_config["posterior"], vae_config["normalize_decoder_input"]) == ("gaussian", False)
    assert json.loads((out / "transformer" / "config.json").read_text())["normalize_tokens"] is False
    gen = _cli("-m", "sphere_ar_hf.cli", "generate", "--model", str(out), "--class-labels", "3", "seven",
               "--steps", "3", "--output-dir", str(tmp_path / "png"), cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "png").glob("*.png") if p.name[0].isdigit()) == \
        ["000_three.png", "001_seven.png"]
    pipe = SphereARPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe([3, 7], generator=_gen(0), num_inference_steps=3, output_type="latent").images
    assert (tokens.norm(dim=-1) - RADIUS).abs().max() > 0.01


# ---- the benchmarks, end to end on a tiny setting ----------------------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_both_ablation_benchmarks_run_end_to_end_and_resume(tmp_path: Path, capsys) -> None:
    ablation = _load("ablation_digits")
    work, out = tmp_path / "work", tmp_path / "docs" / "ablation"
    argv = ["--work-dir", str(work), "--out", str(out), "--train-seeds", "0", "1", "--guidance-scales", "1", "3",
            "--n-per-class", "2", "--steps", "3", "--jobs", "1", "--recipe-args", " ".join(TINY_RECIPE[:-2])]
    summary = ablation.main(argv)
    assert set(summary["variants"]) == {"gaussian", "gaussian_dec_norm", "gaussian_ar_norm", "sphere"}
    for data in summary["variants"].values():
        assert [r["guidance_scale"] for r in data["rows"]] == [1.0, 3.0]
        for r in data["rows"]:
            assert len(r["fd"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["fd"])
            assert r["fd_min"] <= r["fd_mean"] <= r["fd_max"]
    assert set(summary["vaes"]) == {"gaussian", "gaussian_dec_norm", "power_spherical"}
    for vae in summary["vaes"].values():
        assert len(vae["reconstruction_fd"]) == 2 and all(x > 0 for x in vae["reconstruction_fd"])
        assert vae["test_l1_mode"] > 0
    assert summary["vaes"]["power_spherical"]["token_norm_std"] < 1e-4  # its draws lie on the sphere
    # one VAE serves both normalised-decoder variants; each variant's options reached its saved pipeline
    assert sorted(p.name for p in (work / "seed0").iterdir() if p.name.startswith("vae-")) == \
        ["vae-gaussian", "vae-gaussian_dec_norm", "vae-power_spherical"]
    for v, spec in ablation.VARIANTS.items():
        pipeline = Path(json.loads((work / "seed0" / v / "done.json").read_text())["pipeline"])
        assert json.loads((pipeline / "transformer" / "config.json").read_text())["normalize_tokens"] == \
            spec.normalize_tokens
        vae_config = json.loads((pipeline / "vae" / "config.json").read_text())
        assert vae_config["posterior"] == ("power_spherical" if v == "sphere" else "gaussian")
        assert vae_config["normalize_decoder_input"] == (v != "gaussian")
    table = (out.with_suffix(".md")).read_text()
    assert "| diagonal-Gaussian VAE |" in table and "w = 3" in table and out.with_suffix(".png").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["variants"]["sphere"]["rows"][0]["fd"] == \
        summary["variants"]["sphere"]["rows"][0]["fd"]
    assert "total" in capsys.readouterr().out

    # resumable: a rerun redoes only what is missing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("done.json")}
    (work / "seed1" / "sphere" / "eval-3steps-2.json").unlink()
    again = ablation.main(argv)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("done.json")} == stamps
    assert again["variants"]["sphere"]["rows"][1]["fd"] == summary["variants"]["sphere"]["rows"][1]["fd"]

    # other guidance scales over a finished run: each scale is read by its value (w = 3 keeps its numbers, w = 2 is
    # sampled and added), and without --out nothing is written outside the work folder
    argv_scales = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    argv_scales[argv_scales.index("--guidance-scales") + 1:argv_scales.index("--guidance-scales") + 3] = ["3", "2"]
    other = ablation.main(argv_scales)
    for v, data in other["variants"].items():
        assert [r["guidance_scale"] for r in data["rows"]] == [3.0, 2.0]
        assert data["rows"][0]["fd"] == summary["variants"][v]["rows"][1]["fd"]
    stored = json.loads((work / "seed0" / "sphere" / "eval-3steps-2.json").read_text())["rows"]
    assert [r["guidance_scale"] for r in stored] == [1.0, 2.0, 3.0]
    assert (work / "report.md").is_file() and "w = 2" in (work / "report.md").read_text()
    assert "(SE " in (work / "report.md").read_text() and "every cell has 2 training seeds" in \
        (work / "report.md").read_text()

    collapse = _load("variance_collapse")
    results = collapse.main(["--work-dir", str(work), "--out", str(tmp_path / "docs" / "collapse"),
                             "--guidance-scales", "1", "4", "--n-per-class", "2", "--steps", "3", "--threads", "1"])
    for v, entry in results["variants"].items():
        for stats in [entry["real"], *entry["generated"].values()]:
            assert len(stats["norm_mean"]) == 4 and len(stats["within_class_var"]) == 4
            on_sphere = np.allclose(stats["norm_mean"], RADIUS, atol=1e-4) and max(stats["norm_std"]) < 1e-4
            assert on_sphere == ablation.VARIANTS[v].normalize_tokens, (v, stats)
    assert set(results["variants"]["gaussian"]["generated"]) == {"1", "4"}
    assert (tmp_path / "docs" / "collapse.png").stat().st_size > 0
    assert "real (encoded)" in (tmp_path / "docs" / "collapse.md").read_text()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_the_token_recorder_keeps_each_images_tokens_as_the_pipeline_makes_them(guidance_scale: float) -> None:
    collapse = _load("variance_collapse")
    from sphere_ar_hf.evaluation import image_seeds, sample_images

    pipe = _pipeline(normalize_tokens=False)
    labels, seeds = np.array([3, 1, 4, 1, 5]), image_seeds(0, np.arange(5))
    recorder = collapse.TokenRecorder(5, 3, pipe.transformer.config.num_image_tokens, guidance_scale)
    kw = dict(guidance_scale=guidance_scale, num_inference_steps=2)
    images = sample_images(pipe, labels, seeds, 3, callback_on_step_end=recorder, **kw)  # calls of 3 and 2 (padded)
    tokens = recorder.tokens()
    assert tokens.shape == (5, 4, 16) and len(images) == 5
    alone = pipe(labels.tolist(), generator=[_gen(int(s)) for s in seeds], output_type="latent", **kw).images
    torch.testing.assert_close(tokens, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="recorded 0 of 2"):
        collapse.TokenRecorder(5, 3, 4, guidance_scale).tokens()


def test_the_ablation_by_tokens_per_image_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    tokens = _load("ablation_tokens")
    work, out = tmp_path / "work", tmp_path / "docs" / "tokens"
    argv = ["--work-dir", str(work), "--out", str(out), "--tokens", "16", "--train-seeds", "0", "1",
            "--guidance-scales", "1", "3", "--n-per-class", "2", "--vae-epochs", "1", "--ar-epochs", "0.5",
            "--recipe-args", " ".join(TINY_RECIPE[4:-2] + ["--vae_batch_size", "128", "--ar_batch_size", "128"]),
            "--check-tokens", "16", "--check-variants", "sphere",
            "--check-guidance", "3", "--check-seeds", "2", "--check-n-per-class", "1", "--jobs", "1"]
    summary = tokens.main(argv)
    assert list(summary["tokens"]) == ["16"] and summary["recipe"]["16"].startswith("--cnn_channels 16 32 64 ")
    data = summary["tokens"]["16"]
    assert set(data["variants"]) == {"gaussian", "sphere"}
    for v in data["variants"].values():
        assert [r["guidance_scale"] for r in v["rows"]] == [1.0, 3.0]
        for r in v["rows"]:
            assert len(r["fd"]) == 2 and all(math.isfinite(x) and x > 0 for x in r["fd"])
            assert math.isfinite(r["fd_sem"]) and r["fd_min"] <= r["fd_mean"] <= r["fd_max"]
    assert [g["guidance_scale"] for g in summary["gaps"]["16"]] == [1.0, 3.0]
    assert all(math.isfinite(g["difference"]) and math.isfinite(g["se"]) for g in summary["gaps"]["16"])
    # 16 px digits through a patch-4 S-VAE: a 4x4 grid, in the VAE and the AR model
    pipeline = Path(json.loads((work / "tokens16" / "seed1" / "sphere" / "done.json").read_text())["pipeline"])
    assert json.loads((pipeline / "vae" / "config.json").read_text())["cnn_channels"] == [16, 32, 64]
    ar = json.loads((pipeline / "transformer" / "config.json").read_text())
    assert (ar["image_size"], ar["patch_size"], ar["diff_batch_mul"]) == (16, 4, 1)
    # the sampler check: both samplers, each sampling seed, the paired difference
    check = summary["check"]["variants"]["sphere"]
    assert summary["check"]["samplers"] == ["heun:5:0.5", "euler_maruyama:100:1"]
    for side in ("run", "reference"):
        assert len(check[side]["fd"]["values"]) == 2 and all(math.isfinite(x) for x in check[side]["fd"]["values"])
    assert math.isfinite(check["fd_difference"]["mean"]) and isinstance(check["fd_difference"]["within_noise"], bool)
    # the tokens per decoding position, generated (each guidance scale) and real, for every variant
    collapse = summary["collapse"]["16"]
    assert collapse["radius"] == RADIUS
    for v, entry in collapse["variants"].items():
        curves = [entry["real"], *entry["generated"].values(), *entry["per_seed"]["real"],
                  *(s for seeds in entry["per_seed"]["generated"].values() for s in seeds)]
        assert len(curves) == 1 + 2 + 2 + 2 * 2
        for stats in curves:
            assert {k: len(x) for k, x in stats.items()} == {"norm_mean": 16, "norm_std": 16, "within_class_var": 16}
            assert all(math.isfinite(x) for xs in stats.values() for x in xs)
        on_sphere = np.allclose(entry["generated"]["3"]["norm_mean"], RADIUS, atol=1e-4)
        assert on_sphere == (v == "sphere") and np.allclose(entry["real"]["norm_mean"], RADIUS, atol=1e-4) == on_sphere
        lo, hi = entry["generated_range"]["3"]["within_class_var"]
        assert np.all(np.array(lo) <= entry["generated"]["3"]["within_class_var"]) and np.all(
            np.array(hi) >= entry["generated"]["3"]["within_class_var"])
    table = out.with_suffix(".md").read_text()
    assert "| 16 | diagonal-Gaussian VAE |" in table and "The sampler check" in table and "The gap" in table
    assert "real (encoded)" in (tmp_path / "docs" / "tokens_collapse.md").read_text()
    for path in (out.with_suffix(".png"), tmp_path / "docs" / "tokens_collapse.png"):
        assert path.stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["gaps"] == json.loads(json.dumps(summary["gaps"]))

    # resumable: a rerun trains and samples nothing; a lost check file is redone alone, with the same numbers
    files = {p: p.stat().st_mtime_ns for p in work.rglob("*.json")}
    lost = next(work.rglob("eval-100steps-1-sample1.json"))  # the official sampler: the old name
    lost.unlink()
    again = tokens.main(argv)
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.json") if p != lost} == \
        {p: t for p, t in files.items() if p != lost}
    assert again["collapse"] == summary["collapse"]
    for side in ("run", "reference"):  # the same images again (their seconds differ)
        for metric in ("fd", "accuracy"):
            assert again["check"]["variants"]["sphere"][side][metric] == check[side][metric]
    # re-rendered from the JSON alone
    tokens.main(["--from-json", str(out.with_suffix(".json")), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again.md").read_text() == table


@pytest.mark.parametrize(("normalize_tokens", "normalize_decoder_input", "phrase"), [
    (False, False, "a diagonal-Gaussian VAE's, not projected when sampled (nor by the decoder)"),
    (False, True, "a diagonal-Gaussian VAE's, not projected when sampled (the decoder projects its input"),
    (True, True, "a diagonal-Gaussian VAE's, projected onto the sphere of radius √16"),
])
def test_the_model_card_of_a_baseline_says_what_it_is(tmp_path: Path, normalize_tokens: bool,
                                                        normalize_decoder_input: bool, phrase: str) -> None:
    from sphere_ar_hf import hub

    _pipeline(normalize_tokens, normalize_decoder_input=normalize_decoder_input).save_pretrained(tmp_path / "pipe")
    text = " ".join(str(hub.render_model_card(tmp_path / "pipe", repo_id="you/baseline", license="mit")).split())
    assert "ablation baseline of the paper, not SphereAR itself" in text and phrase in text
    assert "every token on a sphere" not in text and "| VAE (diagonal Gaussian) |" in text
    with pytest.raises(hub.HubError, match="ablation baseline, not SphereAR"):
        hub.render_model_card(tmp_path / "pipe", repo_id="you/baseline", license="mit", card="b")
