"""Latent cache: exact posterior parameters, multi-process equality, and the AR training items read from it."""

from __future__ import annotations

import io
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
from PIL import Image

from sphere_ar_hf import SphereVAE
from sphere_ar_hf.training import DataArguments, LatentCacheDataset, cache_latents, load_latent_cache_info, load_vae
from sphere_ar_hf.training.image_transforms import center_crop, decode_image, pixels_to_tensor
from sphere_ar_hf.training.latent_cache import encode_posteriors

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(image_size=32, patch_size=16, z_channels=64, cnn_channels=(32, 32, 32, 32, 64), encoder_layers=1,
                decoder_layers=1)
RES, L, D = 32, 4, 16


def _png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of 9 images in 3 classes (sizes and modes vary) plus one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["ant", "bee", "cow"]):
        (root / cls).mkdir()
        for k in range(3):
            h, w = int(rng.integers(20, 70)), int(rng.integers(20, 70))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if (c + k) % 4 == 3:
                arr = arr[..., 0]  # grayscale
            (root / cls / f"{k}.png").write_bytes(_png(arr))
    (root / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny VAE saved as its own folder and inside a pipeline-style folder (vae/ subfolder)."""
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = SphereVAE(**TINY_VAE).eval()
    vae.save_pretrained(root / "vae-only")
    vae.save_pretrained(root / "pipeline" / "vae")
    (root / "pipeline" / "model_index.json").write_text("{}")
    return root / "vae-only", root / "pipeline"


@pytest.fixture(scope="module")
def vae(vae_dirs: tuple[Path, Path]) -> SphereVAE:
    return load_vae(vae_dirs[0]).eval()


def _data_args(data: Path, tmp: Path, **kw) -> DataArguments:
    kw = {"train_data_dir": str(data), "resolution": RES, "num_classes": None, "cache_dir": str(tmp / "hf"), **kw}
    return DataArguments(**kw)


@pytest.fixture(scope="module")
def cache(data: Path, vae: SphereVAE, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cache")
    return cache_latents(vae, _data_args(data, tmp), tmp / "latents", batch_size=4)


def test_load_vae_accepts_both_layouts(vae_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = load_vae(vae_dirs[0]), load_vae(vae_dirs[1])
    assert isinstance(a, SphereVAE) and isinstance(b, SphereVAE)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="neither a SphereVAE folder"):
        load_vae(tmp_path)


def test_cache_equals_on_the_fly_encoding(cache: Path, data: Path, vae: SphereVAE) -> None:
    ds = datasets.load_from_disk(str(cache))
    assert set(ds.column_names) == {"mu", "kappa", "mu_flip", "kappa_flip", "class_labels", "index"}
    assert len(ds) == 9  # the corrupt file is skipped
    assert ds.features["class_labels"].names == ["ant", "bee", "cow"]
    info = load_latent_cache_info(cache)
    assert info["latent_dim"] == D and info["num_tokens"] == L and info["num_skipped"] == 1
    assert info["id2label"] == {0: "ant", 1: "bee", 2: "cow"} and info["num_classes"] == 3
    assert info["vae_config"]["z_channels"] == 64 and info["source"]["train_data_dir"] == str(data)
    assert json.loads(ds.info.description)["latent_dim"] == D

    source = datasets.load_dataset("imagefolder", data_dir=str(data), split="train",
                                   cache_dir=str(cache.parent / "hf"))
    source = source.cast_column("image", datasets.Image(decode=False))
    rows = ds.with_format("numpy")[:]
    assert rows["mu"].dtype == np.float32 and rows["mu"].shape == (9, L, D) and rows["kappa"].shape == (9, L)
    pixels = torch.stack([pixels_to_tensor(center_crop(decode_image(source[int(i)]["image"]), RES))
                          for i in rows["index"]])
    with torch.no_grad():
        ref = vae.encode(pixels).latent_dist
        ref_flip = vae.encode(pixels.flip(-1)).latent_dist
    torch.testing.assert_close(torch.from_numpy(rows["mu"]), ref.mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(rows["kappa"]), ref.kappa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(rows["mu_flip"]), ref_flip.mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.from_numpy(rows["kappa_flip"]), ref_flip.kappa, atol=1e-5, rtol=1e-5)
    assert not np.allclose(rows["mu"], rows["mu_flip"])
    post = encode_posteriors(vae, pixels)
    torch.testing.assert_close(post["mu_flip"], ref_flip.mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(post["kappa"], ref.kappa, atol=1e-5, rtol=1e-5)
    assert rows["class_labels"].tolist() == [source[int(i)]["label"] for i in rows["index"]]
    np.testing.assert_allclose(np.linalg.norm(rows["mu"], axis=-1), 1.0, atol=1e-5)


def test_cache_guards(data: Path, vae: SphereVAE, cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        cache_latents(vae, _data_args(data, tmp_path), cache)
    with pytest.raises(ValueError, match="image_size 32"):
        cache_latents(vae, _data_args(data, tmp_path, resolution=64), tmp_path / "x")
    # the class count is the dataset's: one that differs is refused before any encoding
    with pytest.raises(ValueError, match=r"--num_classes 5 does not match the dataset: .* names 3 classes"):
        cache_latents(vae, _data_args(data, tmp_path, num_classes=5), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="map-style"):
        cache_latents(vae, _data_args(data, tmp_path, streaming=True), tmp_path / "x")
    with pytest.raises(ValueError, match="label column 'nope'"):
        cache_latents(vae, _data_args(data, tmp_path, label_column="nope"), tmp_path / "x")
    # overwrite replaces atomically, leaving no partial folder behind
    out = tmp_path / "again"
    cache_latents(vae, _data_args(data, tmp_path, max_train_samples=3), out)
    cache_latents(vae, _data_args(data, tmp_path, max_train_samples=5), out, overwrite=True)
    assert len(datasets.load_from_disk(str(out))) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "hf"]


def test_a_failed_overwrite_keeps_the_old_cache_and_leaves_no_debris(data: Path, vae: SphereVAE, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sphere_ar_hf.training import latent_cache

    out = tmp_path / "latents"
    cache_latents(vae, _data_args(data, tmp_path, max_train_samples=3), out)

    def broken(*args, **kwargs):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(latent_cache, "encode_posteriors", broken)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        cache_latents(vae, _data_args(data, tmp_path, max_train_samples=5), out, overwrite=True)
    assert len(datasets.load_from_disk(str(out))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "latents"]


def test_folder_swap_puts_the_old_folder_back_when_the_rename_fails(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """utils.stage_folder / swap_folder_into_place, the two steps of every folder write (also distributed)."""
    from sphere_ar_hf import utils

    out = tmp_path / "folder"
    out.mkdir()
    (out / "a.txt").write_text("old")
    staged = utils.stage_folder(out, shared=True)
    assert staged == utils.shared_staging_path(out) and staged.name == ".folder.tmp-shared"
    (staged / "a.txt").write_text("new")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(Path(dst))
        if Path(dst) == out and Path(src) == staged:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        utils.swap_folder_into_place(staged, out)
    monkeypatch.setattr(utils.os, "replace", real_replace)
    assert (out / "a.txt").read_text() == "old" and len(calls) == 3  # aside, the failed swap, back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".folder.tmp-shared", "folder"]  # only what it was given
    utils.swap_folder_into_place(staged, out)
    assert (out / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    # a writer killed mid-way leaves hidden folders; the next run removes them
    (tmp_path / ".folder.tmp-abc").mkdir()
    (tmp_path / ".folder.old-def").mkdir()
    (tmp_path / ".other.tmp-x").mkdir()
    utils.remove_staged_folders(tmp_path, "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "folder"]


def test_two_processes_equal_one(cache: Path, data: Path, vae_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "latents-2proc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "cache_latents.py"), "--pretrained_vae", str(vae_dirs[1]),
           "--train_data_dir", str(data), "--resolution", str(RES), "--num_classes", "3", "--output_dir", str(out),
           "--batch_size", "3", "--num_workers", "0", "--cpu", "--cache_dir", str(tmp_path / "hf")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wrote a latent cache of 9 images" in proc.stderr
    # a startup summary on the main process only, and a progress bar that ran to its end (how often tqdm redraws
    # it depends on the machine's load, so its lines are not counted)
    assert proc.stderr.count("Latent cache\n") == 1
    assert "10 images (center crops and their flips), 3 classes" in proc.stderr  # 9 and an undecodable one
    assert "latent cache: 100%" in proc.stderr and "2/2 [" in proc.stderr
    two = datasets.load_from_disk(str(out)).with_format("numpy")[:]
    one = datasets.load_from_disk(str(cache)).with_format("numpy")[:]
    assert two.keys() == one.keys()
    np.testing.assert_array_equal(two["index"], one["index"])
    np.testing.assert_array_equal(two["class_labels"], one["class_labels"])
    for key in ("mu", "kappa", "mu_flip", "kappa_flip"):
        np.testing.assert_allclose(two[key], one[key], atol=1e-6, rtol=1e-6)
    info = load_latent_cache_info(out)
    assert info["num_skipped"] == 1 and info["num_examples"] == 9
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    # each process's rows stay in its own file (written by that process, never gathered by the main one)
    shards = sorted(out.glob("*.arrow"))
    assert [p.name for p in shards] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert [len(datasets.Dataset.from_file(str(p))) for p in shards] in ([5, 4], [4, 5])


def test_latent_cache_dataset_items(cache: Path) -> None:
    ds = LatentCacheDataset(cache, seed=5)
    assert len(ds) == 9 and ds.latent_dim == D and ds.id2label == {0: "ant", 1: "bee", 2: "cow"}
    rows = datasets.load_from_disk(str(cache)).with_format("numpy")[:]
    item = ds[0]
    assert item["latents"].shape == (L, D) and item["latents"].dtype == torch.float32
    assert item["class_labels"].dtype == torch.long and int(item["class_labels"]) == int(rows["class_labels"][0])

    def epoch(d: LatentCacheDataset, e: int) -> torch.Tensor:
        d.set_epoch(e)
        return torch.stack([d[i]["latents"] for i in range(len(d))])

    e0 = epoch(ds, 0)
    torch.testing.assert_close(e0.norm(dim=-1), torch.full((9, L), math.sqrt(D)), atol=1e-4, rtol=0)
    assert torch.equal(e0, epoch(LatentCacheDataset(cache, seed=5), 0))  # reproducible per (seed, epoch, index)
    assert torch.equal(ds[3]["latents"], epoch(ds, 0)[3])  # independent of access order
    assert not torch.isclose(e0, epoch(ds, 1)).all(dim=-1).any()  # fresh draws every epoch
    assert not torch.equal(e0, epoch(LatentCacheDataset(cache, seed=6), 0))  # and per seed
    # samples concentrate around mu or mu_flip (whichever was chosen)
    mu, mu_flip = torch.from_numpy(rows["mu"]), torch.from_numpy(rows["mu_flip"])
    cos = (e0 / math.sqrt(D) * mu).sum(-1).mean(-1)
    cos_flip = (e0 / math.sqrt(D) * mu_flip).sum(-1).mean(-1)
    assert (torch.maximum(cos, cos_flip) > 0).all()

    # the posterior mode shows the flip choice exactly: about half of the draws are flips
    mode = LatentCacheDataset(cache, seed=0, sample_posterior=False)
    flips = 0
    for e in range(40):
        out = epoch(mode, e)
        is_plain = torch.isclose(out, mu * math.sqrt(D), atol=1e-5).all(dim=(-1, -2))
        is_flip = torch.isclose(out, mu_flip * math.sqrt(D), atol=1e-5).all(dim=(-1, -2))
        assert bool((is_plain ^ is_flip).all())
        flips += int(is_flip.sum())
    assert 0.4 < flips / (40 * 9) < 0.6
    no_flip = LatentCacheDataset(cache, seed=0, sample_posterior=False, hflip=False)
    torch.testing.assert_close(epoch(no_flip, 3), mu * math.sqrt(D), atol=1e-5, rtol=0)

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["latents"].shape == (4, L, D) and batch["class_labels"].shape == (4,)
