"""Data for the example apps: scikit-learn's bundled digits (no download) or MNIST IDX files.

Both give `(x_train, y_train, x_test, y_test)`: float32 images `[N, 1, H, W]` normalised with MNIST's
mean and std, and int64 labels.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from sambaflow.errors import SambaArgumentError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------- shared preparation


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise SambaArgumentError(f"image_size must be a positive integer, got {image_size!r}")


def _prepare(images01: torch.Tensor, image_size: int) -> torch.Tensor:
    """[N, 1, h, w] images in [0, 1] -> resized to image_size^2, normalised, float32."""
    x = images01.to(torch.float32)
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ((x - MNIST_MEAN) / MNIST_STD).contiguous()


# ---------------------------------------------------------------------------- digits


def digits(image_size: int = 28) -> Split:
    """scikit-learn's 1,797 8x8 digits, resized to image_size^2; a fixed, seeded 80/20 split."""
    from sklearn.datasets import load_digits

    _check_image_size(image_size)
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SEED))
    x, y = _prepare(images[order], image_size), labels[order]
    n_test = round(len(y) * DIGITS_TEST_FRACTION)
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:]


# ---------------------------------------------------------------------------- MNIST IDX files


def _find_idx_file(data_dir: str, name: str) -> str:
    """Path of `name` or `name.gz` in data_dir or data_dir/MNIST/raw (torchvision's layout)."""
    folders = (data_dir, os.path.join(data_dir, "MNIST", "raw"))
    for folder in folders:
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    raise SambaArgumentError(
        f"MNIST file {name!r} (or {name}.gz) not found in {data_dir!r} or {folders[1]!r}: expected the four "
        f"MNIST IDX files ({', '.join(MNIST_FILES.values())}) there; download MNIST, or leave --data-dir "
        "out to use the bundled digits"
    )


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise SambaArgumentError(f"could not read MNIST file {path!r} ({e}): download it again") from None


def _check_magic(data: bytes, path: str, magic: int) -> None:
    found = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if found is None:
        raise SambaArgumentError(
            f"MNIST file {path!r} is {len(data)} bytes, too short to hold an IDX magic number: the "
            "file is truncated or empty; download it again"
        )
    if found != magic:
        raise SambaArgumentError(
            f"MNIST file {path!r} starts with magic number {found:#010x}, expected {magic:#010x} "
            f"(unsigned bytes, {magic & 0xFF} dimensions): not an MNIST IDX file of this kind, or damaged"
        )


def _idx_shape(data: bytes, path: str, ndim: int) -> list[int]:
    """The dimensions in the header, checking that the data after it has exactly that many bytes."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise SambaArgumentError(
            f"MNIST file {path!r} is {len(data)} bytes, shorter than its {header}-byte IDX header: "
            "the file is truncated; download it again"
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise SambaArgumentError(
            f"MNIST file {path!r} is {len(data)} bytes, expected {expected} for shape {dims}: "
            "the file is truncated or damaged; download it again"
        )
    return dims


def _parse_idx(data: bytes, path: str, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file's bytes, checking magic number and size."""
    _check_magic(data, path, magic)
    ndim = magic & 0xFF
    dims = _idx_shape(data, path, ndim)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path: str, magic: int) -> np.ndarray:
    """Read one (optionally gzipped) IDX file of unsigned bytes with the given magic number."""
    return _parse_idx(_read_bytes(path), path, magic)


def _load_pair(data_dir: str, kind: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _find_idx_file(data_dir, MNIST_FILES[f"{kind}_images"])
    labels_path = _find_idx_file(data_dir, MNIST_FILES[f"{kind}_labels"])
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise SambaArgumentError(
            f"MNIST files {images_path!r} ({len(images)} images) and {labels_path!r} "
            f"({len(labels)} labels) do not match: download both again"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1).to(torch.float32) / 255.0
    return _prepare(x, image_size), torch.from_numpy(labels.astype(np.int64))


def mnist(data_dir: str, image_size: int = 28) -> Split:
    """MNIST from IDX files in data_dir (or data_dir/MNIST/raw), plain or .gz; numpy only."""
    _check_image_size(image_size)
    if not os.path.isdir(data_dir):
        raise SambaArgumentError(
            f"MNIST data directory {data_dir!r} does not exist: pass the folder holding "
            f"the MNIST IDX files ({', '.join(MNIST_FILES.values())})"
        )
    x_train, y_train = _load_pair(data_dir, "train", image_size)
    x_test, y_test = _load_pair(data_dir, "test", image_size)
    return x_train, y_train, x_test, y_test


def load(data_dir: str | None, image_size: int = 28) -> Split:
    """MNIST when data_dir is given, else the bundled digits."""
    if data_dir:
        return mnist(data_dir, image_size)
    return digits(image_size)


# ---------------------------------------------------------------------------- batching


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of exactly batch_size; the remainder is dropped so shapes stay static."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SambaArgumentError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(x) != len(y):
        raise SambaArgumentError(f"batches(): x has {len(x)} samples but y has {len(y)}: pass matching data")
    if batch_size > len(x):
        raise SambaArgumentError(
            f"batch size {batch_size} is larger than the {len(x)} samples, so not one "
            "full batch can be made: lower -b/--batch-size"
        )
    return _batches(x, y, batch_size, shuffle, generator)


def _batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n_full = len(x) // batch_size * batch_size
    order = torch.randperm(len(x), generator=generator) if shuffle else None
    for start in range(0, n_full, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            index = order[start : start + batch_size]
            yield x[index], y[index]
