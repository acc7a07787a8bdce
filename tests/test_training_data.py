"""Training data: every loader path, mode conversion, corrupt files, validation and the official augmentation."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser

from sphere_ar_hf.training import (
    DataArguments,
    ImageDataset,
    IterableImageDataset,
    aug_ratio_at,
    build_image_dataset,
    class_names,
    collate_images,
    load_image_dataset,
)
from sphere_ar_hf.training import data as D
from sphere_ar_hf.training import image_transforms as T

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

RES = 32
CLASSES = ["cat", "dog", "fish"]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mode_images() -> dict[str, tuple[str, Image.Image | bytes]]:
    """``{file name: (class, image or raw bytes)}``: every awkward mode, a tiny image and a corrupt file."""
    rgb = Image.fromarray(_rgb(48, 64, 0))
    rgba = Image.fromarray(np.concatenate([_rgb(30, 40, 1), np.full((30, 40, 1), 128, np.uint8)], axis=-1), "RGBA")
    return {
        "rgb.png": ("cat", rgb),
        "gray.png": ("cat", Image.fromarray(_rgb(40, 36, 2)[..., 0])),
        "cmyk.jpg": ("cat", Image.fromarray(_rgb(36, 50, 3)).convert("CMYK")),
        "palette.png": ("dog", Image.fromarray(_rgb(33, 45, 4)).convert("P")),
        "rgba.png": ("dog", rgba),
        "tiny.png": ("dog", Image.fromarray(_rgb(7, 5, 5))),
        "big.jpg": ("fish", Image.fromarray(_rgb(90, 70, 6))),
        "corrupt.jpg": ("fish", b"\xff\xd8\xff\xe0 this is not a jpeg"),
    }


def _encode(image: Image.Image | bytes, name: str) -> bytes:
    if isinstance(image, bytes):
        return image
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if name.endswith(".jpg") else "PNG")
    return buf.getvalue()


def make_imagefolder(root: Path) -> Path:
    for name, (cls, image) in _mode_images().items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(_encode(image, name))
    return root


def make_hf_dataset(labels: list[int] | None = None, names: list[str] | None = CLASSES) -> datasets.Dataset:
    """The same images as an in-memory Dataset with an Image feature (bytes) and a ClassLabel/int label."""
    items = _mode_images()
    images = [{"bytes": _encode(img, name), "path": None} for name, (_, img) in items.items()]
    if labels is None:
        labels = [CLASSES.index(cls) for cls, _ in items.values()]
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label_feature})
    return datasets.Dataset.from_dict({"image": images, "label": labels[: len(images)]}, features=features)


def make_parquet_repo(root: Path, ds: datasets.Dataset | None = None) -> Path:
    """A local folder laid out like a Hub dataset repository (data/train-*.parquet)."""
    (root / "data").mkdir(parents=True)
    (ds if ds is not None else make_hf_dataset()).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def _args(tmp_path: Path, **kw) -> DataArguments:
    kw.setdefault("resolution", RES)
    return DataArguments(cache_dir=str(tmp_path / "hf-cache"), **kw)


def _check_items(items: list, num_classes: int = 3) -> list[dict[str, torch.Tensor]]:
    good = [it for it in items if it is not None]
    assert len(items) - len(good) == 1  # only the corrupt file is skipped
    for it in good:
        px = it["pixel_values"]
        assert px.shape == (3, RES, RES) and px.dtype == torch.float32
        assert float(px.min()) >= -1.0 and float(px.max()) <= 1.0
        assert it["class_labels"].dtype == torch.long and it["class_labels"].shape == ()
        assert 0 <= int(it["class_labels"]) < num_classes
    return good


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


# --------------------------------------------------------------------------------------------------- loaders


def test_imagefolder_modes_and_corrupt_file(folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = _args(tmp_path, train_data_dir=str(folder), num_classes=None)
    ds = build_image_dataset(args, seed=0)
    assert isinstance(ds, ImageDataset) and len(ds) == 8
    assert class_names(load_image_dataset(args), "label") == dict(enumerate(CLASSES))
    with caplog.at_level(logging.WARNING, logger=D.__name__):
        items = [ds[i] for i in range(len(ds))]
    assert "corrupt.jpg" in caplog.text  # the skipped file is named in the logs
    good = _check_items(items)
    # the grayscale image comes out as RGB with three equal channels
    gray_index = [Path(v["path"]).name for v in ds.dataset[:]["image"]].index("gray.png")
    gray = items[gray_index]["pixel_values"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])

    before = D.skipped_image_count()
    loader = torch.utils.data.DataLoader(ds, batch_size=len(ds), collate_fn=collate_images)
    with caplog.at_level(logging.WARNING, logger=D.__name__):
        (batch,) = list(loader)
    assert batch["pixel_values"].shape == (len(good), 3, RES, RES)
    assert batch["class_labels"].shape == (len(good),)
    assert D.skipped_image_count() == before + 1
    assert f"({before + 1} so far" in caplog.text
    assert collate_images([None, None]) is None and D.skipped_image_count() == before + 3


def test_save_to_disk_path_and_custom_columns(tmp_path: Path) -> None:
    ds = make_hf_dataset().rename_columns({"image": "img", "label": "y"})
    ds.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))}).save_to_disk(str(tmp_path / "dict"))

    args = _args(tmp_path, dataset_path=str(tmp_path / "flat"), image_column="img", label_column="y")
    train = build_image_dataset(args, seed=3)
    assert isinstance(train, ImageDataset) and len(train) == 8
    _check_items([train[i] for i in range(len(train))])
    assert class_names(load_image_dataset(args), "y") == dict(enumerate(CLASSES))

    args = _args(tmp_path, dataset_path=str(tmp_path / "dict"), image_column="img", label_column="y",
                 split="validation")
    assert len(load_image_dataset(args)) == 2
    args.split = "test"
    with pytest.raises(ValueError, match="no split 'test'"):
        load_image_dataset(args)


def test_hub_path_on_local_parquet_and_streaming(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # datasets sleeps 5 s at the end of every shuffled parquet stream (an arrow thread-shutdown workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    repo = make_parquet_repo(tmp_path / "repo")
    args = _args(tmp_path, dataset_name=str(repo))
    mapped = build_image_dataset(args, seed=1)
    assert isinstance(mapped, ImageDataset) and len(mapped) == 8
    assert class_names(load_image_dataset(args), "label") == dict(enumerate(CLASSES))
    expected = [mapped[i] for i in range(len(mapped))]
    _check_items(expected)

    args = _args(tmp_path, dataset_name=str(repo), streaming=True, shuffle_buffer_size=0)
    raw = load_image_dataset(args)
    assert isinstance(raw, datasets.IterableDataset)
    assert class_names(raw, "label") == dict(enumerate(CLASSES))
    streamed = build_image_dataset(args, seed=1)
    assert isinstance(streamed, IterableImageDataset)
    got = list(streamed)
    # unshuffled, one process, no workers: stream position == index, so the items equal the map-style ones
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["class_labels"] == b["class_labels"]
    batch = collate_images(got)
    assert batch["pixel_values"].shape == (7, 3, RES, RES)

    # split across 2 processes: disjoint halves covering everything, distinct seeds per process
    parts = [list(build_image_dataset(args, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert sum(len(p) for p in parts) == 8
    labels = sorted(int(it["class_labels"]) for p in parts for it in p if it is not None)
    assert labels == sorted(int(it["class_labels"]) for it in expected if it is not None)

    # shuffled stream: set_epoch reshuffles and changes the augmentation
    args.shuffle_buffer_size = 100
    shuffled = build_image_dataset(args, seed=1)
    shuffled.set_epoch(0)
    e0 = collate_images(list(shuffled))
    shuffled.set_epoch(1)
    e1 = collate_images(list(shuffled))
    assert sorted(e0["class_labels"].tolist()) == sorted(e1["class_labels"].tolist())
    assert not torch.equal(e0["pixel_values"], e1["pixel_values"])

    # max_train_samples on both paths
    assert len(list(build_image_dataset(_args(tmp_path, dataset_name=str(repo), streaming=True,
                                                    max_train_samples=3), seed=0))) == 3
    assert len(build_image_dataset(_args(tmp_path, dataset_name=str(repo), max_train_samples=3), seed=0)) == 3


def test_stream_with_dataloader_workers(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    ds = make_hf_dataset()
    for i in range(2):  # two shards so that both workers get data
        ds.shard(2, i, contiguous=True).to_parquet(str(repo / "data" / f"train-{i:05d}-of-00002.parquet"))
    args = _args(tmp_path, dataset_name=str(repo), streaming=True, shuffle_buffer_size=0)
    loader = torch.utils.data.DataLoader(build_image_dataset(args, seed=0), batch_size=2, num_workers=2,
                                         collate_fn=collate_images)
    batches = [b for b in loader if b is not None]
    assert sum(len(b["class_labels"]) for b in batches) == 7


def test_hf_argument_parser() -> None:
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        args=["--dataset_name", "ILSVRC/imagenet-1k", "--streaming", "--resolution", "128", "--no_hflip"])
    assert args.dataset_name == "ILSVRC/imagenet-1k" and args.streaming and args.resolution == 128 and not args.hflip
    assert args.aug_ratio == 1.0 and (args.aug_decay_start_epoch, args.aug_decay_end_epoch) == (350, 375)
    assert all(f.metadata.get("help") for f in DataArguments.__dataclass_fields__.values())


# --------------------------------------------------------------------------------------------------- validation


def test_missing_columns_raise(folder: Path, tmp_path: Path) -> None:
    for stream in (False, True):
        with pytest.raises(ValueError, match="image column 'picture' not found"):
            load_image_dataset(_args(tmp_path, train_data_dir=str(folder), image_column="picture", streaming=stream))
        with pytest.raises(ValueError, match="label column 'target' not found"):
            load_image_dataset(_args(tmp_path, train_data_dir=str(folder), label_column="target", streaming=stream))
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_dataset(_args(tmp_path))
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_dataset(_args(tmp_path, train_data_dir=str(folder), dataset_path=str(folder)))


def test_out_of_range_labels_raise(tmp_path: Path) -> None:
    bad = make_hf_dataset(labels=[0, 1, 2, 0, 1, 2, 7, 0], names=None)
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"label column 'label'.*\[0, 7\].*\[0, 3\)"):
        load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "bad"), num_classes=3))
    load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "bad"), num_classes=8))  # fine
    with pytest.raises(ValueError, match="no ClassLabel.*--num_classes"):  # a model needs a class count
        load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "bad")), strict_num_classes=True)
    # the S-VAE, which ignores labels, takes them without a count (only negative ones are refused)
    assert len(load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "bad")))) == 8

    negative = make_hf_dataset(labels=[0, 1, -1, 0, 1, 2, 2, 0])  # e.g. ImageNet's unlabeled test split
    negative.save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "neg")))

    strings = datasets.Dataset.from_dict({"image": [None] * 2, "label": ["cat", "dog"]})
    strings.save_to_disk(str(tmp_path / "str"))
    with pytest.raises(ValueError, match="integer class ids"):
        load_image_dataset(_args(tmp_path, dataset_path=str(tmp_path / "str")))

    # streaming: checked lazily, with the offending example named
    repo = make_parquet_repo(tmp_path / "repo", bad)
    stream = build_image_dataset(_args(tmp_path, dataset_name=str(repo), num_classes=3, streaming=True,
                                       shuffle_buffer_size=0), seed=0)
    with pytest.raises(ValueError, match=r"example 6 has label 7.*\[0, 3\)"):
        list(stream)


def test_num_classes_and_names_come_from_the_dataset(folder: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """By default the class count is the ClassLabel's (an imagefolder's folder names); a --num_classes that
    differs is an error where a model is trained on the labels, and silent (no warning) where it is not."""
    assert DataArguments().num_classes is None  # the default: the dataset's
    for kw in ({"train_data_dir": str(folder)}, {"train_data_dir": str(folder), "num_classes": 0}):
        args = _args(tmp_path, **kw)
        ds = build_image_dataset(args, strict_num_classes=True)
        assert D.resolve_num_classes(args, ds) == 3 and class_names(ds.dataset) == dict(enumerate(CLASSES))
    assert D.resolve_num_classes(_args(tmp_path, train_data_dir=str(folder), num_classes=3),
                                 load_image_dataset(_args(tmp_path, train_data_dir=str(folder)))) == 3
    wrong = _args(tmp_path, train_data_dir=str(folder), num_classes=1000)
    with pytest.raises(ValueError, match=r"^--num_classes 1000 does not match the dataset: label column 'label' "
                                         r"names 3 classes \(cat, dog, fish\); drop --num_classes"):
        build_image_dataset(wrong, strict_num_classes=True)
    with caplog.at_level(logging.WARNING):  # the S-VAE / LoRA path: a bound, no warning
        assert len(build_image_dataset(wrong)) == 8
    assert not [r for r in caplog.records if "num_classes" in r.getMessage()]


# --------------------------------------------------------------------------------------------------- augmentation


def test_aug_ratio_decays_linearly() -> None:
    args = DataArguments()
    assert aug_ratio_at(0, args) == 1.0 and aug_ratio_at(349, args) == 1.0 and aug_ratio_at(350, args) == 1.0
    assert aug_ratio_at(355, args) == pytest.approx(0.8)
    assert aug_ratio_at(360, args) == pytest.approx(0.6)
    assert aug_ratio_at(374, args) == pytest.approx(0.04)
    assert aug_ratio_at(375, args) == 0.0 and aug_ratio_at(399, args) == 0.0
    half = DataArguments(aug_ratio=0.5, aug_decay_start_epoch=10, aug_decay_end_epoch=20)
    assert [aug_ratio_at(e, half) for e in (0, 10, 15, 20, 30)] == pytest.approx([0.5, 0.5, 0.25, 0.0, 0.0])
    assert aug_ratio_at(1000, DataArguments(aug_decay_start_epoch=-1)) == 1.0  # official: invalid window, no decay


def test_dataset_set_epoch_updates_ratio(folder: Path, tmp_path: Path) -> None:
    ds = build_image_dataset(_args(tmp_path, train_data_dir=str(folder), aug_decay_start_epoch=2,
                                   aug_decay_end_epoch=6), seed=0)
    ratios = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        ratios.append(ds.aug_ratio)
    assert ratios == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


def test_augmentation_reproducible_and_varies(folder: Path, tmp_path: Path) -> None:
    args = _args(tmp_path, train_data_dir=str(folder))
    a, b, other_seed = build_image_dataset(args, 7), build_image_dataset(args, 7), build_image_dataset(args, 8)

    def epoch_items(ds: ImageDataset, epoch: int) -> list:
        ds.set_epoch(epoch)
        return [ds[i] for i in range(len(ds))]

    def same(x: list, y: list) -> list[bool]:
        return [torch.equal(p["pixel_values"], q["pixel_values"]) for p, q in zip(x, y) if p is not None]

    a3, b3 = epoch_items(a, 3), epoch_items(b, 3)
    assert all(same(a3, b3))  # same (seed, epoch, index): identical
    assert all(same([b[i] for i in reversed(range(len(b)))][::-1], a3))  # access order does not matter
    assert not all(same(a3, epoch_items(a, 4)))  # another epoch
    assert not all(same(a3, epoch_items(other_seed, 3)))  # another seed
    state = np.random.get_state(), torch.get_rng_state()
    np.random.seed(0), torch.manual_seed(0)
    x = a[0]
    np.random.seed(1), torch.manual_seed(1)
    assert torch.equal(x["pixel_values"], a[0]["pixel_values"])  # the global RNGs play no part
    np.random.set_state(state[0]), torch.set_rng_state(state[1])


def test_aug_ratio_zero_is_center_crop_with_half_flips(tmp_path: Path) -> None:
    image = Image.fromarray(_rgb(45, 60, 11))
    for cls in ("a", "b"):  # imagefolder needs two class folders to infer labels
        (tmp_path / "one" / cls).mkdir(parents=True)
    image.save(tmp_path / "one" / "a" / "x.png")
    image.save(tmp_path / "one" / "b" / "y.png")
    ds = build_image_dataset(_args(tmp_path, train_data_dir=str(tmp_path / "one"), aug_ratio=0.0), seed=0)
    center = T.pixels_to_tensor(T.center_crop(image, RES))
    flipped = center.flip(-1)
    flips = 0
    for epoch in range(200):
        ds.set_epoch(epoch)
        px = ds[0]["pixel_values"]
        is_center, is_flip = torch.equal(px, center), torch.equal(px, flipped)
        assert is_center or is_flip
        flips += is_flip
    assert 70 <= flips <= 130

    no_flip = build_image_dataset(_args(tmp_path, train_data_dir=str(tmp_path / "one"), aug_ratio=0.0,
                                        hflip=False), seed=0)
    for epoch in range(20):
        no_flip.set_epoch(epoch)
        assert torch.equal(no_flip[0]["pixel_values"], center)

    # with aug_ratio = 1 the crops move around (random crops, not the center crop)
    rand = build_image_dataset(_args(tmp_path, train_data_dir=str(tmp_path / "one"), hflip=False), seed=0)
    outs = set()
    for epoch in range(20):
        rand.set_epoch(epoch)
        outs.add(rand[0]["pixel_values"].numpy().tobytes())
    assert len(outs) > 10


def test_crops_shapes_and_scale_range() -> None:
    tiny = Image.fromarray(_rgb(7, 5, 0))
    assert T.center_crop(tiny, RES).shape == (RES, RES, 3)
    for seed in range(20):
        assert T.random_crop(tiny, RES, np.random.default_rng(seed)).shape == (RES, RES, 3)
    wide = Image.fromarray(_rgb(3, 200, 1))
    assert T.center_crop(wide, RES).shape == (RES, RES, 3)
    # random crop short side drawn from [res, ceil(res / 0.8)]: a 40x40 crop region at most, so on a square image
    # scaled to 40 the crop keeps >= 80% of the side; check the drawn sizes cover the range
    sizes = {int(np.random.default_rng(s).integers(RES, int(np.ceil(RES / 0.8)) + 1)) for s in range(200)}
    assert sizes == set(range(RES, 41))
    for mode in ("1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F"):
        img = Image.fromarray(_rgb(9, 11, 2)).convert(mode) if mode not in ("I;16", "I", "F") else \
            Image.fromarray(_rgb(9, 11, 2)[..., 0].astype(np.uint16) * 257).convert(mode)
        rgb = T.to_rgb(img)
        assert rgb.mode == "RGB" and rgb.size == (11, 9), mode
    sixteen = T.to_rgb(Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    assert np.asarray(sixteen).min() == 255  # 16-bit white stays white
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(T.to_rgb(transparent)).min() == 255  # alpha composited on white
