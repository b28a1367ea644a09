"""Hyperspectral scenes (Indian Pines, Pavia University, Salinas): patches around labelled pixels.

Files: the standard MATLAB files of the GIC group's "Hyperspectral Remote Sensing Scenes" page
(Universidad del País Vasco), read with ``scipy.io.loadmat`` (no pickle), from ``data_dir`` (or
``$LOWBIT_DATA``), directly or in a ``<name>/`` or ``hyperspectral/`` folder:

=================  ==========================================  ===========================  ========
dataset            files (variable)                            cube H x W x bands           classes
=================  ==========================================  ===========================  ========
indian_pines       Indian_pines_corrected.mat (indian_pines_    145 x 145 x 200               16
                   corrected), Indian_pines_gt.mat (..._gt)
pavia_university   PaviaU.mat (paviaU), PaviaU_gt.mat           610 x 340 x 103               9
                   (paviaU_gt)
salinas            Salinas_corrected.mat (salinas_corrected),   512 x 217 x 204               16
                   Salinas_gt.mat (salinas_gt)
=================  ==========================================  ===========================  ========

Ground truth 0 is "unlabelled" (never a sample); labels 1..K become 0..K-1. Other sizes are
accepted (with a log line), so small files of the same format work.

Samples, in this order:

1. Split by pixel: each class's labelled pixels are shuffled (``split_seed``) and the first
   ``round(train_fraction * n_c)`` (at least 1, and at least 1 left for test when ``n_c >= 2``)
   go to training: a seeded, stratified split.
2. Bands: optionally PCA to ``pca`` components (fitted on the *training* pixels only, so no test
   statistics leak in; HybridSN fits it on the whole scene), then each band standardised with the
   training pixels' mean and std.
3. Patches: the ``patch x patch`` window centred on each labelled pixel (``patch`` odd), the scene
   padded by reflection at its borders, served as float32 ``(bands, patch, patch)``.

Neighbouring train and test pixels share most of their patches, so pixel-split accuracy is
optimistic compared with a spatially disjoint split (a known caveat of this benchmark protocol).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetFormatError, DatasetNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HSIScene:
    """How one scene is stored and what it holds."""

    files: tuple[str, str]  # cube file, ground-truth file
    keys: tuple[str, str]  # their MATLAB variable names
    shape: tuple[int, int, int]  # H, W, bands of the standard file
    classes: tuple[str, ...]
    pca: int  # default number of PCA components (HybridSN's choice)


SCENES: dict[str, HSIScene] = {
    "indian_pines": HSIScene(
        ("Indian_pines_corrected.mat", "Indian_pines_gt.mat"), ("indian_pines_corrected", "indian_pines_gt"),
        (145, 145, 200),
        ("Alfalfa", "Corn-notill", "Corn-mintill", "Corn", "Grass-pasture", "Grass-trees",
         "Grass-pasture-mowed", "Hay-windrowed", "Oats", "Soybean-notill", "Soybean-mintill",
         "Soybean-clean", "Wheat", "Woods", "Buildings-Grass-Trees-Drives", "Stone-Steel-Towers"), 30),
    "pavia_university": HSIScene(
        ("PaviaU.mat", "PaviaU_gt.mat"), ("paviaU", "paviaU_gt"), (610, 340, 103),
        ("Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil", "Bitumen",
         "Self-Blocking Bricks", "Shadows"), 15),
    "salinas": HSIScene(
        ("Salinas_corrected.mat", "Salinas_gt.mat"), ("salinas_corrected", "salinas_gt"), (512, 217, 204),
        ("Brocoli_green_weeds_1", "Brocoli_green_weeds_2", "Fallow", "Fallow_rough_plow", "Fallow_smooth",
         "Stubble", "Celery", "Grapes_untrained", "Soil_vinyard_develop", "Corn_senesced_green_weeds",
         "Lettuce_romaine_4wk", "Lettuce_romaine_5wk", "Lettuce_romaine_6wk", "Lettuce_romaine_7wk",
         "Vinyard_untrained", "Vinyard_vertical_trellis"), 15),
}

_URL = "https://www.ehu.eus/ccwintco/index.php/Hyperspectral_Remote_Sensing_Scenes"


@dataclass
class HSIData:
    train_x: np.ndarray  # (N, bands, p, p) float32
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str


# ---- pure functions ------------------------------------------------------------------------
def read_mat_array(path: Path, key: str, ndim: int) -> np.ndarray:
    """Variable ``key`` of the MATLAB file ``path``, checked to have ``ndim`` dimensions."""
    import scipy.io
    from scipy.io.matlab import MatReadError

    try:
        m = scipy.io.loadmat(path)
    except (MatReadError, ValueError, OSError, NotImplementedError, TypeError) as e:
        raise DatasetFormatError(f"{path}: cannot read as a MATLAB v4/v5 file ({e})") from e
    if key not in m:
        found = sorted(k for k in m if not k.startswith("__"))
        raise DatasetFormatError(f"{path}: needs the variable {key!r}; the file holds {found}")
    a = np.asarray(m[key])
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.number):
        raise DatasetFormatError(f"{path}: {key!r} must be a numeric {ndim}-D array, got {a.dtype} {a.shape}")
    return a


def split_pixels(y: np.ndarray, train_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices of ``y``: per class, ``round(train_fraction * n_c)`` random
    samples (at least 1, leaving at least 1 for test when ``n_c >= 2``) go to train."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    rng = np.random.default_rng(seed)
    train = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(max(1, round(train_fraction * len(idx))), max(1, len(idx) - 1))
        train.append(idx[:k])
    mask = np.zeros(len(y), bool)
    mask[np.concatenate(train)] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def pca_fit(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, components (bands, k))`` of the rows of ``x``, components by decreasing variance,
    the sign of each fixed so that its largest-magnitude entry is positive."""
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"pca must be between 1 and the number of bands ({x.shape[1]}), got {k}")
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:k].T
    signs = np.sign(comps[np.abs(comps).argmax(0), np.arange(k)])
    return mean, comps * np.where(signs == 0, 1, signs)


def extract_patches(cube: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch: int) -> np.ndarray:
    """``(N, bands, patch, patch)`` windows of the ``(H, W, bands)`` cube centred on
    ``(rows[i], cols[i])``, the cube padded by reflection (edge pixel not repeated)."""
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch must be an odd integer >= 1 (the pixel sits in the middle), got {patch!r}")
    r = patch // 2
    H, W = cube.shape[:2]
    if r and (r >= H or r >= W):
        raise ValueError(f"patch {patch} is too large for a {H} x {W} scene (reflection needs "
                         "patch // 2 < H and W)")
    padded = np.pad(cube, ((r, r), (r, r), (0, 0)), mode="reflect") if r else cube
    win = np.lib.stride_tricks.sliding_window_view(padded, (patch, patch), axis=(0, 1))  # H, W, B, p, p
    return np.ascontiguousarray(win[rows, cols], dtype=np.float32)


# ---- the loader ----------------------------------------------------------------------------
def _find(name: str, scene: HSIScene, search: Any) -> tuple[Path, Path]:
    for d in search.dirs:
        for base in (d, d / name, d / "hyperspectral"):
            search.note(f"{base}/{scene.files[0]} + {scene.files[1]}")
            cube, gt = base / scene.files[0], base / scene.files[1]
            if cube.is_file() and gt.is_file():
                return cube, gt
    raise DatasetNotFoundError(
        name, search.searched,
        f"download {scene.files[0]} and {scene.files[1]} from {_URL} into <dir> or <dir>/{name}; "
        "pass data_dir=... (CLI: --data-dir) or set LOWBIT_DATA")


def load_hsi(
    name: str,
    search: Any,
    patch: int = 11,
    pca: int | str | None = "default",
    train_fraction: float = 0.1,
    split_seed: int = 0,
) -> HSIData:
    """Read scene ``name`` (see :data:`SCENES`) found through ``search`` (``.dirs``, ``.note``,
    ``.searched``; see :mod:`lowbit.data.datasets`) and make its patch samples (module docstring).

    ``pca``: number of components, ``None`` for all bands, ``"default"`` for the scene's usual
    count (30 for Indian Pines, 15 otherwise) or all bands when the file has fewer.
    """
    if name not in SCENES:
        raise ValueError(f"unknown hyperspectral scene {name!r}; known: {', '.join(SCENES)}")
    scene = SCENES[name]
    cube_path, gt_path = _find(name, scene, search)
    cube = read_mat_array(cube_path, scene.keys[0], 3)
    gt = read_mat_array(gt_path, scene.keys[1], 2)
    if cube.shape[:2] != gt.shape:
        raise DatasetFormatError(f"{gt_path}: ground truth is {gt.shape} but the cube {cube_path.name} is "
                                 f"{cube.shape[:2]} (H x W must match)")
    if cube.shape != scene.shape:
        log.info("%s: cube %s differs from the standard %s", cube_path, cube.shape, scene.shape)
    gt = gt.astype(np.int64)
    K = len(scene.classes)
    if gt.min() < 0 or gt.max() > K:
        raise DatasetFormatError(f"{gt_path}: labels must be 0 (unlabelled) .. {K}, got "
                                 f"{gt.min()} .. {gt.max()}")
    rows, cols = np.nonzero(gt)
    if len(rows) < 2:
        raise DatasetFormatError(f"{gt_path}: fewer than 2 labelled pixels")
    y = gt[rows, cols] - 1
    tr, te = split_pixels(y, train_fraction, split_seed)
    bands = cube.shape[2]
    flat = cube.reshape(-1, bands).astype(np.float64)
    pix = rows * cube.shape[1] + cols
    if pca == "default":
        pca = scene.pca if scene.pca < bands else None
    if pca is not None:
        mean, comps = pca_fit(flat[pix[tr]], int(pca))
        flat = (flat - mean) @ comps
    mu, sd = flat[pix[tr]].mean(0), flat[pix[tr]].std(0)
    flat = (flat - mu) / np.where(sd > 0, sd, 1.0)
    data = flat.reshape(cube.shape[0], cube.shape[1], -1)
    x = extract_patches(data, rows, cols, patch)
    src = (f"{cube_path} ({name}, {len(y)} labelled pixels, {data.shape[2]} bands"
           f"{' after PCA' if pca is not None else ''}, {patch}x{patch} patches, train fraction "
           f"{train_fraction:g}, split seed {split_seed})")
    return HSIData(x[tr], y[tr], x[te], y[te], list(scene.classes), src)


def write_scene(directory: str | Path, name: str, cube: np.ndarray, gt: np.ndarray) -> tuple[Path, Path]:
    """Write ``cube`` (H, W, bands) and ``gt`` (H, W) as the two standard ``.mat`` files of
    scene ``name`` in ``directory`` (for tests and for converting other copies)."""
    import scipy.io

    scene = SCENES[name]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = d / scene.files[0], d / scene.files[1]
    scipy.io.savemat(paths[0], {scene.keys[0]: cube})
    scipy.io.savemat(paths[1], {scene.keys[1]: gt})
    return paths

