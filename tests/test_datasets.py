"""Example-app data: bundled digits, the MNIST IDX reader, batching and the MNIST transform."""

import gzip
import os

import numpy as np
import pytest
import torch

from sambaflow.app import datasets
from sambaflow.app.datasets import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MNIST_MEAN, MNIST_STD
from sambaflow.errors import SambaArgumentError
from sambaflow.samba.utils.dataset.mnist import dataset_transform

LOW, HIGH = -MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD


def unnormalise(x):
    return x * MNIST_STD + MNIST_MEAN


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_labels():
    x_train, y_train, x_test, y_test = datasets.digits()
    assert x_train.shape == (1438, 1, 28, 28) and x_test.shape == (359, 1, 28, 28)
    assert y_train.shape == (1438,) and y_test.shape == (359,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    labels = torch.cat([y_train, y_test])
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).min() > 150  # every class present, roughly balanced


def test_digits_are_normalised_like_mnist():
    x_train, _, x_test, _ = datasets.digits()
    x = torch.cat([x_train, x_test])
    assert x.min().item() == pytest.approx(LOW, abs=1e-5)  # black pixels
    assert x.max().item() <= HIGH + 1e-5
    pixels = unnormalise(x)
    assert 0.25 < pixels.mean().item() < 0.35  # digits' ink in [0, 1]; normalised mean is not 0
    assert (x_train - x_train.mean()).abs().sum() > 0


def test_digits_at_native_size_are_the_sklearn_pixels():
    from sklearn.datasets import load_digits

    x_train, y_train, x_test, y_test = datasets.digits(image_size=8)
    pixels = (unnormalise(torch.cat([x_train, x_test])) * 16).squeeze(1).double()
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)
    bunch = load_digits()
    original = {(int(t), tuple(img.flatten().astype(int))) for img, t in zip(bunch.images, bunch.target)}
    split = {
        (int(t), tuple(p.round().int().flatten().tolist()))
        for p, t in zip(pixels, torch.cat([y_train, y_test]))
    }
    assert split == original


def test_digits_split_is_deterministic_and_disjoint():
    a, b = datasets.digits(), datasets.digits()
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    x_train, _, x_test, _ = a
    train_keys = {row.numpy().tobytes() for row in x_train.flatten(1)}
    assert sum(row.numpy().tobytes() in train_keys for row in x_test.flatten(1)) < 5  # a few true duplicates


def test_digits_is_shuffled_not_sklearn_order():
    from sklearn.datasets import load_digits

    _, y_train, _, _ = datasets.digits()
    assert not torch.equal(y_train[:100], torch.from_numpy(load_digits().target[:100]))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_digits_bad_image_size(bad):
    with pytest.raises(SambaArgumentError, match="image_size"):
        datasets.digits(bad)


# ---------------------------------------------------------------------------- MNIST IDX files


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path, data, gz):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def fake_mnist(folder, gz, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": (rng.integers(0, 256, (n_train, 28, 28)), IDX_IMAGES_MAGIC),
        "train-labels-idx1-ubyte": (rng.integers(0, 10, n_train), IDX_LABELS_MAGIC),
        "t10k-images-idx3-ubyte": (rng.integers(0, 256, (n_test, 28, 28)), IDX_IMAGES_MAGIC),
        "t10k-labels-idx1-ubyte": (rng.integers(0, 10, n_test), IDX_LABELS_MAGIC),
    }
    os.makedirs(folder, exist_ok=True)
    for name, (array, magic) in arrays.items():
        write(folder / name, idx_bytes(array, magic), gz)
    return {name: array for name, (array, _) in arrays.items()}


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    raw = fake_mnist(tmp_path, gz)
    x_train, y_train, x_test, y_test = datasets.mnist(str(tmp_path))
    assert x_train.shape == (6, 1, 28, 28) and x_test.shape == (4, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    expected = (torch.from_numpy(raw["train-images-idx3-ubyte"]).float() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(x_train[:, 0], expected, atol=1e-6)
    assert y_train.tolist() == raw["train-labels-idx1-ubyte"].tolist()
    assert y_test.tolist() == raw["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_torchvision_layout_and_load(tmp_path):
    raw = fake_mnist(tmp_path / "MNIST" / "raw", gz=True)
    _, y_train, x_test, _ = datasets.load(str(tmp_path))
    assert y_train.tolist() == raw["train-labels-idx1-ubyte"].tolist()
    assert x_test.shape == (4, 1, 28, 28)
    assert datasets.load(str(tmp_path), image_size=14)[0].shape == (6, 1, 14, 14)


def test_load_without_data_dir_is_digits():
    assert torch.equal(datasets.load(None)[1], datasets.digits()[1])


def test_mnist_missing_file(tmp_path):
    fake_mnist(tmp_path, gz=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(SambaArgumentError, match="t10k-labels-idx1-ubyte.*not found"):
        datasets.mnist(str(tmp_path))


def test_mnist_missing_directory(tmp_path):
    with pytest.raises(SambaArgumentError, match="does not exist"):
        datasets.mnist(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated_file(tmp_path, gz):
    fake_mnist(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()[:-100]
    os.remove(path)
    write(path, data, gz)
    with pytest.raises(SambaArgumentError, match="train-images-idx3-ubyte.*truncated"):
        datasets.mnist(str(tmp_path))


def test_mnist_truncated_gzip_stream(tmp_path):
    fake_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SambaArgumentError, match="train-labels-idx1-ubyte.gz"):
        datasets.mnist(str(tmp_path))


def test_mnist_header_only_partly_there(tmp_path):
    fake_mnist(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"\0\0")
    with pytest.raises(SambaArgumentError, match="header"):
        datasets.mnist(str(tmp_path))


def test_mnist_wrong_magic(tmp_path):
    fake_mnist(tmp_path, gz=False)
    # labels written where images are expected: magic 0x801 instead of 0x803
    labels = (tmp_path / "train-labels-idx1-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(labels)
    with pytest.raises(SambaArgumentError, match=r"magic number 0x00000801, expected 0x00000803"):
        datasets.mnist(str(tmp_path))


def test_mnist_count_mismatch(tmp_path):
    fake_mnist(tmp_path, gz=False)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5), IDX_LABELS_MAGIC), gz=False)
    with pytest.raises(SambaArgumentError, match="6 images.*5 labels"):
        datasets.mnist(str(tmp_path))


# ---------------------------------------------------------------------------- batches


def test_batches_drop_last_and_cover_each_sample_once():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    got = list(datasets.batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert len(got) == 3 and all(bx.shape == (3, 1) and by.shape == (3,) for bx, by in got)
    seen = torch.cat([by for _, by in got])
    assert len(set(seen.tolist())) == 9
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in got)  # x and y stay paired


def test_batches_in_order_and_shuffled_reproducibly():
    x, y = torch.arange(8).float(), torch.arange(8)
    assert [b.tolist() for _, b in datasets.batches(x, y, 4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    first = [b.tolist() for _, b in datasets.batches(x, y, 4, True, torch.Generator().manual_seed(3))]
    again = [b.tolist() for _, b in datasets.batches(x, y, 4, True, torch.Generator().manual_seed(3))]
    assert first == again and first != [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_batches_errors_are_raised_at_the_call():
    x, y = torch.zeros(5, 2), torch.zeros(5)
    with pytest.raises(SambaArgumentError, match="larger than the 5 samples"):
        datasets.batches(x, y, 6, shuffle=False)
    with pytest.raises(SambaArgumentError, match="batch_size"):
        datasets.batches(x, y, 0, shuffle=False)
    with pytest.raises(SambaArgumentError, match="4"):
        datasets.batches(x, y[:4], 2, shuffle=False)


# ---------------------------------------------------------------------------- dataset_transform


def test_dataset_transform_on_uint8_array():
    image = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    out = dataset_transform({"num_features": 784})(image)
    assert out.shape == (784,) and out.dtype == torch.float32
    expected = (image.astype(np.float64).reshape(-1) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert out[0].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert out[1].item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_dataset_transform_on_tensors_and_namespace():
    import argparse

    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    transform = dataset_transform(argparse.Namespace(num_features=784))
    from_uint8 = transform(image)
    from_float = transform(image.float() / 255)
    assert torch.allclose(from_uint8, from_float, atol=1e-6)
    assert torch.allclose(from_uint8, ((image.float() / 255 - 0.1307) / 0.3081).flatten(), atol=1e-6)


class FakePILImage:
    """What torchvision's MNIST yields, without PIL: `.mode`, `.convert`, the array protocol."""

    def __init__(self, pixels, mode="L"):
        self.pixels, self.mode = pixels, mode

    def convert(self, mode):
        return FakePILImage(self.pixels.mean(axis=-1).astype(np.uint8), mode)

    def __array__(self, dtype=None, copy=None):
        return self.pixels if dtype is None else self.pixels.astype(dtype)


def test_dataset_transform_on_pil_like_images():
    grey = np.random.default_rng(1).integers(0, 256, (28, 28)).astype(np.uint8)
    transform = dataset_transform({"num_features": 784})
    assert torch.equal(transform(FakePILImage(grey)), transform(grey))
    rgb = FakePILImage(np.repeat(grey[:, :, None], 3, axis=2), mode="RGB")
    assert torch.equal(transform(rgb), transform(grey))


def test_dataset_transform_errors():
    with pytest.raises(SambaArgumentError, match="num_features"):
        dataset_transform({})
    with pytest.raises(SambaArgumentError, match="num_features"):
        dataset_transform({"num_features": 0})
    with pytest.raises(SambaArgumentError, match="100 values.*784"):
        dataset_transform({"num_features": 784})(np.zeros((10, 10), np.uint8))


def test_dataset_transform_is_picklable_for_dataloader_workers():
    import pickle

    transform = pickle.loads(pickle.dumps(dataset_transform({"num_features": 784})))
    assert transform(np.zeros((28, 28), np.uint8)).shape == (784,)
