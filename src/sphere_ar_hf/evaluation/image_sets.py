"""Image sets to evaluate: ADM-layout ``.npz`` files and folders of images; a streaming ``.npz`` writer.

The ADM layout (OpenAI's guided-diffusion evaluator, used for the paper's numbers): ``arr_0`` the images, uint8
``(N, H, W, 3)``; ``arr_1`` (optional) the class labels ``(N,)``; reference batches such as
``VIRTUAL_imagenet256_labeled.npz`` also hold the Inception statistics ``mu``, ``sigma`` (pool features) and
``mu_s``, ``sigma_s`` (spatial features). Images are read in batches straight from the archive, never all at once.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..utils import atomic_write
from .metrics import covariance_problem

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "write_npz"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same arrays give the same file, byte for byte


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    raise ValueError(f"unsupported .npy format version {version}")


class ImageSet:
    """A set of RGB images: an ADM ``.npz`` or a folder of image files (sorted by name).

    ``num_images``, ``image_shape`` ``(H, W, 3)``, ``labels`` (``arr_1`` or ``None``), ``statistics`` (whichever of
    ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` the file stores); :meth:`batches` yields uint8 ``(n, H, W, 3)`` arrays.
    An ``.npz`` with statistics but no ``arr_0`` has no images: only its stored Fréchet statistics can be used.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.labels: np.ndarray | None = None
        self.statistics: dict[str, np.ndarray] = {}
        self._files: list[Path] | None = None
        self._array: np.ndarray | None = None
        if self.path.is_dir():
            self._open_folder()
        elif self.path.is_file():
            self._open_npz()
        else:
            raise FileNotFoundError(f"{self.path}: no such file or folder")

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray | None = None, name: str = "<arrays>") -> ImageSet:
        """An in-memory set: uint8 images ``(N, H, W, 3)`` and optional labels."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
            raise ValueError(f"expected uint8 images (N, H, W, 3) of at least 1x1 pixels, got {images.dtype} of "
                             f"shape {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"got {len(labels)} labels for {len(images)} images")
        self = cls.__new__(cls)
        self.path, self.statistics, self._files, self._array = Path(name), {}, None, images
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        self.num_images, self.image_shape = len(images), (tuple(images.shape[1:]) if len(images) else None)
        return self

    def __repr__(self) -> str:
        return f"ImageSet({str(self.path)!r}, num_images={self.num_images}, image_shape={self.image_shape})"

    # ---- opening ---------------------------------------------------------------------------------------------
    def _open_folder(self) -> None:
        from PIL import Image

        self._files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        self.num_images = len(self._files)
        self.image_shape = None
        for f in self._files:  # headers only
            with Image.open(f) as im:
                shape = (im.height, im.width, 3)
            if self.image_shape is None:
                self.image_shape, first = shape, f
            elif shape != self.image_shape:
                raise ValueError(f"{self.path}: images of different sizes: {first.name} is "
                                 f"{self.image_shape[1]}x{self.image_shape[0]}, {f.name} is {shape[1]}x{shape[0]}")

    def _open_npz(self) -> None:
        try:
            archive = np.load(self.path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{self.path}: not a readable .npz file ({e or type(e).__name__})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{self.path}: a .npy array, not an .npz archive (expected arr_0 = images)")
        with archive:
            keys = set(archive.files)
            self.statistics = {k: archive[k] for k in STATISTICS_KEYS if k in keys}
            if "arr_1" in keys:
                self.labels = np.asarray(archive["arr_1"]).reshape(-1)
        self._check_statistics()
        if "arr_0" not in keys:
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"{self.path}: no images (arr_0) and no statistics (mu, sigma); found "
                                 f"{sorted(keys) or 'nothing'}")
            self.num_images, self.image_shape = 0, None
            return
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            shape, fortran, dtype = _read_npy_header(f)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran or 0 in shape[1:3]:
            raise ValueError(f"{self.path}: arr_0 must be uint8 images (N, H, W, 3) of at least 1x1 pixels, got "
                             f"{dtype} of shape {shape}")
        self.num_images, self.image_shape = int(shape[0]), tuple(int(s) for s in shape[1:])
        if self.labels is not None and len(self.labels) != self.num_images:
            raise ValueError(f"{self.path}: arr_1 holds {len(self.labels)} labels for {self.num_images} images")

    def _check_statistics(self) -> None:
        """Stored statistics must be a mean vector and a covariance matrix of its length (each pair)."""
        for mu_key, sigma_key in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if (mu_key in self.statistics) != (sigma_key in self.statistics):
                raise ValueError(f"{self.path}: {mu_key} and {sigma_key} come together; found only one of them")
            if mu_key not in self.statistics:
                continue
            mu, sigma = self.statistics[mu_key], self.statistics[sigma_key]
            if mu.ndim != 1 or not np.isfinite(mu).all():
                raise ValueError(f"{self.path}: {mu_key} must be a finite vector, got shape {mu.shape}")
            why = covariance_problem(sigma)
            if why is None and sigma.shape != (len(mu), len(mu)):
                why = f"shape {sigma.shape} for a mean of length {len(mu)}"
            if why is not None:
                raise ValueError(f"{self.path}: {sigma_key} is not a covariance matrix: {why}")

    # ---- reading ---------------------------------------------------------------------------------------------
    def batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """The images in order, ``batch_size`` at a time (uint8 ``(n, H, W, 3)``)."""
        if self._array is not None:
            yield from (self._array[i:i + batch_size] for i in range(0, self.num_images, batch_size))
            return
        if self._files is not None:
            from PIL import Image

            for i in range(0, self.num_images, batch_size):
                batch = []
                for f in self._files[i:i + batch_size]:
                    with Image.open(f) as im:
                        batch.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                yield np.stack(batch)
            return
        if not self.num_images:
            return
        per_image = int(np.prod(self.image_shape))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            _read_npy_header(f)
            for i in range(0, self.num_images, batch_size):
                n = min(batch_size, self.num_images - i)
                data = f.read(n * per_image)
                if len(data) != n * per_image:
                    raise ValueError(f"{self.path}: arr_0 ends after {i + len(data) // per_image} of "
                                     f"{self.num_images} images (truncated file)")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.image_shape)

    def images(self) -> np.ndarray:
        """All images at once (for small sets)."""
        if not self.num_images:
            return np.zeros((0, *(self.image_shape or (0, 0, 3))), dtype=np.uint8)
        return np.concatenate(list(self.batches(max(1, self.num_images))))


def write_npz(path: str | os.PathLike, parts: Iterable[tuple[np.ndarray, np.ndarray]], num_images: int,
              image_shape: tuple[int, int, int]) -> Path:
    """Write an ADM ``.npz`` (``arr_0`` uint8 images, ``arr_1`` int64 labels) from ``(images, labels)`` parts, one
    part in memory at a time, to a temporary file renamed into place once complete (uncompressed, like
    ``np.savez``; fixed timestamps, so the same images give the same bytes)."""
    path = Path(path)
    labels = []
    written = 0
    with atomic_write(path) as out, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(zipfile.ZipInfo("arr_0.npy", _ZIP_DATE), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": (num_images, *image_shape)})
            for images, part_labels in parts:
                if images.dtype != np.uint8 or images.shape[1:] != tuple(image_shape):
                    raise ValueError(f"write_npz: expected uint8 images of shape (n, {image_shape}), got "
                                     f"{images.dtype} {images.shape}")
                f.write(np.ascontiguousarray(images).tobytes())
                labels.append(np.asarray(part_labels, dtype=np.int64))
                written += len(images)
        if written != num_images:
            raise ValueError(f"write_npz: got {written} images, expected {num_images}")
        with zf.open(zipfile.ZipInfo("arr_1.npy", _ZIP_DATE), "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels) if labels else np.zeros(0, np.int64))
    return path
