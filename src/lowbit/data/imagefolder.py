"""Image-folder datasets, as a directory or a zip archive.

Layout (``<root>`` may be the top of the tree or one directory below it, as in
``cifar10/train/airplane/0000.jpg``)::

    <root>/train/<class>/<image>     (.jpg .jpeg .png .bmp .ppm .pgm .tif .webp .gif)
    <root>/test/<class>/<image>      (or <root>/val/<class>/<image>)

Labels follow the alphabetical order of the class names unless ``class_order`` is
given; samples are ordered by label, then file name (loaders shuffle).

Two ways to read one:

* :func:`read_image_folder` / :func:`load_image_folder` decode every image once with PIL
  into ``uint8`` arrays (all images the same size, or resized to ``size``) and cache the
  result as ``.npy`` files (see :mod:`lowbit.data.cache`); the next load reads the cache
  in a fraction of a second. Decoding uses a pool of ``workers`` forked processes.
* :class:`ImageFolderStream` / :func:`load_lazy_image_folder` keep only the file list and
  decode each batch on the fly (ImageNet-sized data): resize + center crop for test,
  a light random-resized-crop + flip for training.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing as mp
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cache as _cache
from .bundle import DataBundle, channel_stats, make_bundle
from .errors import DatasetFormatError, DatasetNotFoundError
from .loader import Augment, Loader, normalize, parse_augment

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "FolderLayout",
    "ImageFolderArrays",
    "ImageFolderStream",
    "load_image_folder",
    "load_lazy_image_folder",
    "read_image_folder",
    "scan_image_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm", ".tif", ".tiff",
     ".webp", ".gif"}
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SPLITS = ("train", "test", "val")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------- sources
class _Source:
    """Read-only access to the files of a directory or a zip archive by relative name.

    A zip's central directory is parsed once (60k entries take a while); members are then
    read by offset through a file handle opened per process, so a forked decoding worker
    inherits the parsed index and never shares a file position with its parent.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.is_zip = False
        elif self.path.is_file():
            if not zipfile.is_zipfile(self.path):
                raise DatasetFormatError(f"{self.path}: neither a directory nor a zip archive")
            self.is_zip = True
        else:
            raise FileNotFoundError(f"no such directory or zip archive: {self.path}")
        self._members: dict[str, zipfile.ZipInfo] | None = None
        self._fh: Any = None
        self._pid = -1

    def _index(self) -> dict[str, zipfile.ZipInfo]:
        if self._members is None:
            with zipfile.ZipFile(self.path) as zf:
                self._members = {i.filename: i for i in zf.infolist() if not i.is_dir()}
        return self._members

    def names(self) -> list[str]:
        if self.is_zip:
            return list(self._index())
        out: list[str] = []
        root = str(self.path)
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= 3:  # <prefix>/<split>/<class>/ is as deep as images go
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            out += [prefix + f for f in filenames]
        return out

    def _handle(self) -> Any:
        if self._fh is None or self._pid != os.getpid():
            if self._fh is not None:  # a forked worker's copy of the parent's handle: its offset is
                self._fh.close()      # shared with the parent, so this process opens its own
            self._fh = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            self._pid = os.getpid()
        return self._fh

    def read(self, name: str) -> bytes:
        if not self.is_zip:
            return (self.path / name).read_bytes()
        info = self._index().get(name)
        if info is None:
            raise DatasetFormatError(f"{self.path}: no member {name!r}")
        if info.flag_bits & 0x1 or info.compress_type not in (zipfile.ZIP_STORED,
                                                               zipfile.ZIP_DEFLATED):
            with zipfile.ZipFile(self.path) as zf:  # encrypted/exotic: let zipfile complain
                return zf.read(info)
        fh = self._handle()
        fh.seek(info.header_offset)
        header = fh.read(_ZIP_HEADER.size)
        if len(header) != _ZIP_HEADER.size or header[:4] != b"PK\x03\x04":
            raise DatasetFormatError(f"{self.path}: bad local header for {name!r}")
        fields = _ZIP_HEADER.unpack(header)
        fh.seek(info.header_offset + _ZIP_HEADER.size + fields[10] + fields[11])
        data = fh.read(info.compress_size)
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)
        if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
            raise DatasetFormatError(f"{self.path}: member {name!r} is corrupt (size/CRC)")
        return data

    def fingerprint(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        if self.is_zip:
            return _cache.file_fingerprint(self.path)
        h = hashlib.sha256()
        for n in sorted(names if names is not None else self.names()):
            st = (self.path / n).stat()
            h.update(f"{n}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return {"path": str(self.path.resolve()), "listing": h.hexdigest()}

    def close(self) -> None:
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None


_ZIP_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (zipfile.structFileHeader)


# ------------------------------------------------------------------------------ layout
@dataclass
class FolderLayout:
    """Where the images of an image-folder tree are: ``files[split]`` is a list of
    ``(label, name)`` sorted by label then name."""

    prefix: str
    classes: list[str]
    files: dict[str, list[tuple[int, str]]]

    @property
    def test_split(self) -> str | None:
        return "test" if "test" in self.files else ("val" if "val" in self.files else None)


def _is_image(name: str) -> bool:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_image_folder(
    names: Sequence[str], where: str = "", class_order: Sequence[str] | None = None
) -> FolderLayout:
    """Find the ``<root>/<split>/<class>/<image>`` layout among relative file names."""
    found: dict[str, dict[str, dict[str, list[str]]]] = {}
    for n in names:
        if not _is_image(n):
            continue
        parts = n.split("/")
        for depth in (0, 1):
            if len(parts) == depth + 3 and parts[depth] in _SPLITS:
                prefix = "/".join(parts[:depth])
                split, cls = parts[depth], parts[depth + 1]
                found.setdefault(prefix, {}).setdefault(split, {}).setdefault(cls, []).append(n)
                break
    if not found:
        sample = ", ".join(list(names)[:3]) or "no files"
        raise DatasetFormatError(
            f"{where}: no images laid out as [<root>/]train/<class>/<image> "
            f"(found {len(names)} files: {sample}{', ...' if len(names) > 3 else ''})"
        )
    if len(found) > 1:
        raise DatasetFormatError(
            f"{where}: several image-folder roots: {sorted(p or '.' for p in found)}; "
            "point to one of them"
        )
    prefix, splits = next(iter(found.items()))
    if "train" not in splits:
        raise DatasetFormatError(f"{where}: no train/ split under {prefix or '.'!r}")
    seen = sorted(set().union(*(set(c) for c in splits.values())))
    if class_order is None:
        classes = sorted(splits["train"])
        extra = sorted(set(seen) - set(classes))
        if extra:
            raise DatasetFormatError(f"{where}: classes {extra} appear in test but not in train")
    else:
        classes = list(class_order)
        if len(set(classes)) != len(classes):
            raise ValueError(f"class_order has duplicates: {classes}")
        extra = sorted(set(seen) - set(classes))
        if extra:
            raise DatasetFormatError(f"{where}: classes {extra} are not in class_order {classes}")
    label = {c: i for i, c in enumerate(classes)}
    files = {
        split: [(label[c], n) for c in sorted(by_cls, key=label.__getitem__)
                for n in sorted(by_cls[c])]
        for split, by_cls in splits.items()
    }
    return FolderLayout(prefix=prefix, classes=classes, files=files)


# ----------------------------------------------------------------------------- decoding
def _open_image(data: bytes, name: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(f"{name}: cannot decode image ({e})") from e
    return im


def _decode_many(
    src: _Source, names: Sequence[str], mode: str, hw: tuple[int, int], resize: bool
) -> np.ndarray:
    """Decode ``names`` into a ``(k, C, H, W)`` uint8 array."""
    from PIL import Image

    H, W = hw
    C = 1 if mode == "L" else 3
    out = np.empty((len(names), C, H, W), dtype=np.uint8)
    for i, n in enumerate(names):
        im = _open_image(src.read(n), n)
        if im.mode != mode:
            im = im.convert(mode)
        if im.size != (W, H):
            if not resize:
                raise DatasetFormatError(
                    f"{n}: image is {im.size[1]}x{im.size[0]} (HxW), the others are {H}x{W}; "
                    "pass size=(H, W) to resize"
                )
            im = im.resize((W, H), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        out[i] = a[None] if C == 1 else a.transpose(2, 0, 1)
    return out


_CHUNK = 1000  # images per decoding task (and per progress report)
_FORK_SOURCE: _Source | None = None  # set in the parent just before forking workers


def _decode_task(task: tuple[list[str], str, tuple[int, int], bool]) -> np.ndarray:
    names, mode, hw, resize = task
    assert _FORK_SOURCE is not None
    return _decode_many(_FORK_SOURCE, names, mode, hw, resize)


def _decode_all(
    src: _Source,
    names: list[str],
    mode: str,
    hw: tuple[int, int],
    resize: bool,
    workers: int,
    progress: Progress | None,
) -> np.ndarray:
    total = len(names)
    chunk = _CHUNK
    C = 1 if mode == "L" else 3
    out = np.empty((total, C, *hw), dtype=np.uint8)
    tasks = [(names[i : i + chunk], mode, hw, resize) for i in range(0, total, chunk)]
    use_pool = workers > 1 and len(tasks) > 1 and "fork" in mp.get_all_start_methods()
    done = 0
    if progress:
        progress(0, total)
    if use_pool:
        # fork: the workers inherit the parsed zip index and need only PIL/numpy, so they
        # start at once (spawn would re-import torch in each)
        global _FORK_SOURCE
        _FORK_SOURCE = src
        try:
            with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
                for arr in pool.imap(_decode_task, tasks):
                    out[done : done + len(arr)] = arr
                    done += len(arr)
                    if progress:
                        progress(done, total)
        finally:
            _FORK_SOURCE = None
    else:
        for t in tasks:
            arr = _decode_many(src, *t)
            out[done : done + len(arr)] = arr
            done += len(arr)
            if progress:
                progress(done, total)
    return out


def _as_hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


@dataclass
class ImageFolderArrays:
    """Decoded image-folder splits: uint8 ``(N, C, H, W)`` images, int64 labels."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str
    from_cache: bool = False


_ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


def read_image_folder(
    path: str | os.PathLike[str],
    *,
    size: int | Sequence[int] | None = None,
    class_order: Sequence[str] | None = None,
    mode: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    progress: Progress | None = None,
) -> ImageFolderArrays:
    """Decode an image-folder directory or zip into arrays (cached as ``.npy``).

    Args:
        path: the directory or ``.zip`` (layout in the module docstring).
        size: ``H`` or ``(H, W)`` to resize every image to (bilinear); default: all
            images must already have the size of the first one.
        class_order: label order (default: sorted class names).
        mode: ``"RGB"`` or ``"L"``; default: ``"L"`` if the first image is grayscale.
        cache, cache_dir: use the decoded-array cache (``cache_dir`` overrides
            ``$LOWBIT_CACHE`` / ``~/.cache/lowbit``).
        workers: decoding processes (1: decode in this process).
        progress: called as ``progress(done, total)`` while decoding.
    """
    src = _Source(path)
    try:
        hw_req = _as_hw(size)
        if mode is not None and mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        names = None if src.is_zip else src.names()  # a zip is identified by its stat
        desc = {
            "source": src.fingerprint(None if names is None else [n for n in names
                                                                  if _is_image(n)]),
            "size": hw_req,
            "class_order": list(class_order) if class_order is not None else None,
            "mode": mode,
        }
        key = _cache.make_key(desc)
        if cache:
            hit = _cache.load_entry("imagefolder", key, _ARRAY_NAMES, cache_dir)
            if hit is not None:
                arrays, meta = hit
                log.info("image folder %s: loaded decoded arrays from cache", src.path)
                return ImageFolderArrays(**arrays, classes=list(meta["classes"]),
                                         source=str(src.path), from_cache=True)
        if names is None:
            names = src.names()
        layout = scan_image_folder(names, str(src.path), class_order)
        test_split = layout.test_split
        if test_split is None:
            raise DatasetFormatError(f"{src.path}: no test/ or val/ split next to train/")
        train, test = layout.files["train"], layout.files[test_split]
        first = _open_image(src.read(train[0][1]), train[0][1])
        use_mode = mode or ("L" if first.mode in _GRAY_MODES else "RGB")
        hw = hw_req or (first.size[1], first.size[0])
        all_names = [n for _, n in train] + [n for _, n in test]
        log.info("decoding %d images from %s (%s, %dx%d)", len(all_names), src.path,
                 use_mode, *hw)
        x = _decode_all(src, all_names, use_mode, hw, hw_req is not None, workers, progress)
        res = ImageFolderArrays(
            train_x=x[: len(train)],
            train_y=np.array([lab for lab, _ in train], dtype=np.int64),
            test_x=x[len(train) :],
            test_y=np.array([lab for lab, _ in test], dtype=np.int64),
            classes=layout.classes,
            source=str(src.path),
        )
        if cache:
            _cache.save_entry(
                "imagefolder", key,
                {n: getattr(res, n) for n in _ARRAY_NAMES},
                {"classes": layout.classes, "description": desc, "mode": use_mode,
                 "test_split": test_split, "train": len(train), "test": len(test)},
                cache_dir,
            )
        return res
    finally:
        src.close()


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    test_batch_size: int = 1000,
    augment: Any = None,
    seed: int = 0,
    train_subset: int | None = None,
    flatten: bool = False,
    size: int | Sequence[int] | None = None,
    class_order: Sequence[str] | None = None,
    mode: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    default_augment: Augment | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 2,
    progress: Progress | None = None,
    name: str = "imagefolder",
) -> DataBundle:
    """An image-folder directory or zip as a :class:`DataBundle` (in memory).

    ``mean``/``std`` default to the training split's per-channel statistics; ``augment``
    (see :func:`lowbit.data.parse_augment`) defaults to ``default_augment`` (none).
    Other arguments as in :func:`read_image_folder`.
    """
    if not Path(path).exists():
        raise DatasetNotFoundError(
            name, [str(path)],
            "point to a directory or .zip laid out as <root>/train/<class>/<image> and "
            "<root>/test/<class>/<image>",
        )
    arr = read_image_folder(path, size=size, class_order=class_order, mode=mode, cache=cache,
                            cache_dir=cache_dir, workers=workers, progress=progress)
    if mean is None or std is None:
        m, s = channel_stats(arr.train_x)
        mean = m if mean is None else mean
        std = s if std is None else std
    aug = parse_augment(augment, default_augment, arr.train_x.shape[2])
    return make_bundle(
        name, arr.train_x, arr.train_y, arr.test_x, arr.test_y,
        num_classes=len(arr.classes), mean=mean, std=std, classes=arr.classes,
        source=f"{arr.source} (image folder{', decoded cache' if arr.from_cache else ''})",
        batch_size=batch_size, test_batch_size=test_batch_size, augment=aug, seed=seed,
        train_subset=train_subset, flatten=flatten,
    )


# ------------------------------------------------------------------------------- lazy
class ImageFolderStream(Loader):
    """Batches decoded on the fly from image files (for data too big to hold decoded).

    Test transform (``train_transform=False``): resize the shorter side to ``resize``,
    center crop ``crop`` x ``crop``. Training transform: a light random-resized crop
    (area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``, position
    uniform) resized to ``crop`` x ``crop``, then a horizontal flip with probability 1/2.
    All draws come from the epoch generator (see :mod:`lowbit.data.loader`), so batches
    are reproducible. Images are converted to RGB; ``workers`` threads decode.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        names: Sequence[str],
        labels: Sequence[int],
        *,
        train_transform: bool = False,
        resize: int = 256,
        crop: int = 224,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flatten: bool = False,
        workers: int = 2,
    ) -> None:
        if len(names) != len(labels):
            raise ValueError(f"{len(names)} names but {len(labels)} labels")
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
        super().__init__(len(names), batch_size=batch_size, shuffle=shuffle,
                         drop_last=drop_last, seed=seed,
                         augment=Augment(0, True) if train_transform else None)
        self.path = Path(path)
        self.names = list(names)
        self._y = torch.as_tensor(list(labels), dtype=torch.int64)
        self.train_transform = bool(train_transform)
        self.resize, self.crop = int(resize), int(crop)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.mean, self.std = tuple(mean), tuple(std)
        self.flatten = bool(flatten)
        self.workers = int(workers)
        self._src: _Source | None = None

    @property
    def y(self) -> torch.Tensor:
        return self._y

    @property
    def sample_shape(self) -> tuple[int, ...]:
        s = (3, self.crop, self.crop)
        return (math.prod(s),) if self.flatten else s

    def _source(self) -> _Source:
        if self._src is None:
            self._src = _Source(self.path)
        return self._src

    def _draw(self, g: torch.Generator) -> dict[str, torch.Tensor]:
        if not self.train_transform:
            return {}
        return {"u": torch.rand(self._n, 5, generator=g, dtype=torch.float64)}

    def _transform(self, data: bytes, name: str, u: Sequence[float] | None) -> np.ndarray:
        from PIL import Image

        im = _open_image(data, name)
        if im.mode != "RGB":
            im = im.convert("RGB")
        W0, H0 = im.size
        c = self.crop
        if u is None:
            if W0 <= H0:
                nw, nh = self.resize, max(self.resize, round(H0 * self.resize / W0))
            else:
                nw, nh = max(self.resize, round(W0 * self.resize / H0)), self.resize
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = round((nw - c) / 2), round((nh - c) / 2)
            im = im.crop((left, top, left + c, top + c))
        else:
            s = self.scale[0] + u[0] * (self.scale[1] - self.scale[0])
            lr0, lr1 = math.log(self.ratio[0]), math.log(self.ratio[1])
            r = math.exp(lr0 + u[1] * (lr1 - lr0))
            area = s * W0 * H0
            w = min(W0, max(1, round(math.sqrt(area * r))))
            h = min(H0, max(1, round(math.sqrt(area / r))))
            left = min(W0 - w, int(u[2] * (W0 - w + 1)))
            top = min(H0 - h, int(u[3] * (H0 - h + 1)))
            im = im.resize((c, c), Image.BILINEAR, box=(left, top, left + w, top + h))
            if u[4] < 0.5:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(im, dtype=np.uint8)

    def _batch(
        self, idx: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._source()
        ids = idx.tolist()
        blobs = [(src.read(self.names[i]), self.names[i]) for i in ids]
        us: list[Any] = draws["u"].tolist() if "u" in draws else [None] * len(ids)
        if self.workers > 1 and len(ids) > 1:
            with ThreadPoolExecutor(self.workers) as ex:
                imgs = list(ex.map(lambda a: self._transform(a[0][0], a[0][1], a[1]),
                                   zip(blobs, us, strict=True)))
        else:
            imgs = [self._transform(b, n, u) for (b, n), u in zip(blobs, us, strict=True)]
        xb = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
        x = normalize(xb, self.mean, self.std, scale=255.0).contiguous()
        if self.flatten:
            x = x.reshape(x.shape[0], -1)
        return x, self._y[idx]

    def _options(self) -> dict[str, Any]:
        return dict(train_transform=self.train_transform, resize=self.resize, crop=self.crop,
                    scale=self.scale, ratio=self.ratio, batch_size=self.batch_size,
                    shuffle=self.shuffle, drop_last=self.drop_last, seed=self.seed,
                    mean=self.mean, std=self.std, flatten=self.flatten, workers=self.workers)

    def replace(self, **overrides: Any) -> ImageFolderStream:
        opts = self._options()
        if "augment" in overrides:  # Loader-generic spelling: augment=None -> test transform
            overrides["train_transform"] = bool(overrides.pop("augment"))
        unknown = set(overrides) - set(opts)
        if unknown:
            raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(opts)}")
        opts.update(overrides)
        new = ImageFolderStream(self.path, self.names, self._y.tolist(), **opts)
        new.epoch = self.epoch
        return new

    def subset(self, n: int, seed: int = 0, **overrides: Any) -> ImageFolderStream:
        idx = self._subset_indices(n, seed).tolist()
        sub = ImageFolderStream(self.path, [self.names[i] for i in idx],
                                [int(self._y[i]) for i in idx], **self._options())
        return sub.replace(**overrides) if overrides else sub


def load_lazy_image_folder(
    path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    test_batch_size: int = 250,
    augment: Any = None,
    seed: int = 0,
    train_subset: int | None = None,
    flatten: bool = False,
    resize: int = 256,
    crop: int = 224,
    class_order: Sequence[str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    workers: int = 2,
    name: str = "imagefolder",
) -> DataBundle:
    """A big image folder (train/ and val/ or test/) as a :class:`DataBundle` of
    :class:`ImageFolderStream` loaders. ``augment``: ``None``/``True`` -> random-resized
    crop + flip for training; ``False``/``"none"`` -> the test transform for both."""
    p = Path(path)
    if not p.exists():
        raise DatasetNotFoundError(
            name, [str(p)],
            "point to a directory laid out as <root>/train/<class>/<image> and "
            "<root>/val/<class>/<image>",
        )
    src = _Source(p)
    try:
        layout = scan_image_folder(src.names(), str(p), class_order)
    finally:
        src.close()
    test_split = layout.test_split
    if test_split is None:
        raise DatasetFormatError(f"{p}: no val/ or test/ split next to train/")
    train_tf = augment is None or bool(parse_augment(augment, Augment(0, True)))
    common = dict(resize=resize, crop=crop, seed=seed, mean=mean, std=std, flatten=flatten,
                  workers=workers)
    tr = layout.files["train"]
    te = layout.files[test_split]
    train: ImageFolderStream = ImageFolderStream(
        p, [n for _, n in tr], [lab for lab, _ in tr], train_transform=train_tf,
        batch_size=batch_size, shuffle=True, **common)
    if train_subset is not None:
        train = train.subset(int(train_subset), seed)
    test = ImageFolderStream(p, [n for _, n in te], [lab for lab, _ in te],
                             train_transform=False, batch_size=test_batch_size,
                             shuffle=False, **common)
    return DataBundle(
        name=name, train=train, test=test, num_classes=len(layout.classes),
        in_shape=train.sample_shape, mean=tuple(mean), std=tuple(std),
        classes=layout.classes, source=f"{p} (image folder, decoded per batch)",
    )
