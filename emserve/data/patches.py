"""2D training patches cut from 3D crops, as the study trains 2D networks on slices of 3D data.

A patch is one plane along a chosen axis, or for a network with depth context (2.5D) a thin stack of `depth`
adjacent planes centred on it, as channels; only the centre plane's labels come with it. Raw EM comes scaled to
[-1, 1]; labels keep the store's encoding (0 absent, 1 present, 255 unannotated) until `label_channels` turns them
into the network's convention (+1 present, -1 absent, 0 unknown), so "unannotated" survives all the way to the
loss. Flips and 90 degree
rotations are applied identically to raw and labels. Class-balanced sampling centres a share of the patches on
voxels of a requested class group, so rare organelles are seen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from emserve.checks import check_choice, check_depth
from emserve.classes import PRESENT, UNKNOWN
from emserve.data.store import EMStore, LabelledCrop

AXES = {"z": 0, "y": 1, "x": 2}
IN_MEMORY_LIMIT = 1 << 30  # EM levels smaller than this are read once; larger ones are read window by window


@dataclass
class PatchBatch:
    """A batch of 2D patches: raw [B,depth,H,W] float32 in [-1,1] (the centre plane's adjacent planes as channels),
    labels [B,K,H,W] uint8 (0/1/255) of the centre plane, dataset [B]."""

    raw: np.ndarray
    labels: np.ndarray
    dataset: np.ndarray

    @property
    def annotated(self) -> np.ndarray:
        return self.labels != UNKNOWN


def label_channels(labels: np.ndarray) -> np.ndarray:
    """Store encoding (0/1/255) -> network channels: +1 present, -1 absent, 0 unannotated (float32)."""
    out = np.where(labels == PRESENT, 1.0, -1.0).astype(np.float32)
    out[labels == UNKNOWN] = 0.0
    return out


def class_presence(labels: np.ndarray) -> np.ndarray:
    """Per-patch class-presence condition [B,K]: +1 if the class occurs, -1 if annotated everywhere and absent,
    0 if it is absent from what was annotated but part of the patch is unannotated (we cannot tell)."""
    present = (labels == PRESENT).any(axis=(2, 3))
    fully_annotated = (labels != UNKNOWN).all(axis=(2, 3))
    return np.where(present, 1.0, np.where(fully_annotated, -1.0, 0.0)).astype(np.float32)


def check_axis(axis: str) -> int:
    check_choice("axis", axis, AXES)
    return AXES[axis]


def check_sections(depth: int, planes: int) -> None:
    """Refuse a volume of one section for a network with depth context: mirroring could only repeat it."""
    if depth > 1 and planes < 2:
        raise ValueError(f"depth: {depth} adjacent sections need a volume of 2 sections at least along the slicing "
                         f"axis; this one has {planes} (a 2D image: use a depth-1 network)")


def neighbour_sections(index: int, depth: int, planes: int) -> list[int]:
    """The `depth` section indices centred on `index` in a volume of `planes` sections, mirrored at its ends (as
    numpy's "reflect" pads: -1 -> 1), so a section near the edge still gets `depth` real sections of context."""
    check_sections(depth, planes)
    if planes == 1:
        return [0]
    period = 2 * (planes - 1)
    out = []
    for i in range(index - depth // 2, index + depth // 2 + 1):
        i %= period
        out.append(period - i if i >= planes else i)
    return out


def _plane_window(shape: Sequence[int], axis: int, patch: int, where: str) -> tuple[int, int, int]:
    """Ranges of valid patch corners (plane index, first in-plane corner, second) for a volume of `shape`."""
    in_plane = [s for i, s in enumerate(shape) if i != axis]
    if min(in_plane) < patch:
        raise ValueError(f"patch_size: {patch} does not fit {where} of shape {tuple(shape)} along axis "
                         f"{'zyx'[axis]} (in-plane {tuple(in_plane)}); use a patch size <= {min(in_plane)}")
    return shape[axis], in_plane[0] - patch + 1, in_plane[1] - patch + 1


def _take(volume: np.ndarray, axis: int, index: int, a: int, b: int, patch: int) -> np.ndarray:
    """The patch at plane `index` and in-plane corner (a, b); volume may have a leading channel axis."""
    lead = (slice(None),) * (volume.ndim - 3)
    key: list[object] = [slice(a, a + patch), slice(b, b + patch)]
    key.insert(axis, index)
    return np.asarray(volume[(*lead, *key)])


def _take_stack(volume: np.ndarray, axis: int, index: int, a: int, b: int, patch: int, depth: int) -> np.ndarray:
    """[depth, patch, patch]: the patches of the `depth` sections around plane `index` (`neighbour_sections`)."""
    return np.stack([_take(volume, axis, i, a, b, patch)
                     for i in neighbour_sections(index, depth, volume.shape[axis])])


def elastic_coordinates(size: int, rng: np.random.Generator, smoothness: float = 8.0, amplitude: float = 4.0,
                        ) -> np.ndarray:
    """Sampling coordinates [2, size, size] of a smooth random deformation: white noise smoothed over `smoothness`
    pixels and scaled to `amplitude` pixels (root mean square), so membranes bend and objects change shape
    without tearing."""
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), smoothness) for _ in range(2)])
    field *= amplitude / max(float(np.sqrt((field**2).sum(0).mean())), 1e-12)
    return np.mgrid[:size, :size].astype(np.float64) + field


def warp(array: np.ndarray, coordinates: np.ndarray, order: int) -> np.ndarray:
    """Every channel of `array` [C, H, W] resampled at `coordinates` (borders reflect): order 1 for EM, 0
    (nearest) for labels, which keeps their codes instead of blending them."""
    return np.stack([ndimage.map_coordinates(channel, coordinates, order=order, mode="mirror") for channel in array])


def _augment(arrays: Sequence[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and 90 degree rotation for every array (last two axes)."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


class PatchSampler:
    """Random (optionally class-balanced) 2D patches from labelled crops.

    `class_groups` lists groups of class names, e.g. [["mito_mem", "mito_lum"], ["ld_mem", "ld_lum"]]; with
    probability `balance` a patch is centred on a random voxel of a random group (groups chosen uniformly, so
    a rare group is seen as often as a common one). `dataset_ids` maps dataset names to condition ids. `depth`
    sections around each plane come as its raw channels (`neighbour_sections`: mirrored at the crop's ends).
    `elastic`: every patch is also deformed elastically (`elastic_coordinates`; EM and labels alike, before its
    flip and rotation), new shapes from the same annotations; needs `augment`.
    """

    def __init__(
        self,
        crops: Sequence[LabelledCrop],
        patch_size: int,
        *,
        axis: str = "z",
        augment: bool = True,
        class_groups: Sequence[Sequence[str]] = (),
        balance: float = 0.5,
        dataset_ids: Mapping[str, int] | None = None,
        depth: int = 1,
        elastic: bool = False,
    ):
        if not crops:
            raise ValueError("crops: no labelled crops to sample from")
        classes = crops[0].classes
        for c in crops:
            if c.classes != classes:
                raise ValueError(f"crops: {c.dataset}/{c.name} has classes {c.classes}, expected {classes}")
        if not 0 <= balance <= 1:
            raise ValueError(f"balance: {balance} is not a probability in [0, 1]")
        if elastic and not augment:
            raise ValueError("elastic: deforming is augmentation; allowed with augment=True only")
        self.crops, self.classes, self.patch, self.augment = list(crops), classes, patch_size, augment
        self.axis, self.depth = check_axis(axis), check_depth(depth)
        self.dataset_ids = dict(dataset_ids or {n: i for i, n in enumerate(sorted({c.dataset for c in crops}))})
        self.windows = [_plane_window(c.raw.shape, self.axis, patch_size, f"crop {c.dataset}/{c.name}")
                        for c in crops]
        self.balance, self.elastic = balance, elastic
        self.groups = [self._group_voxels(group) for group in class_groups]
        self.groups = [g for g in self.groups if g]  # groups that never occur cannot be balanced for

    def _group_voxels(self, group: Sequence[str]) -> list[tuple[int, np.ndarray]]:
        """(crop index, voxel coordinates [N,3]) of every crop where any class of `group` is present."""
        unknown = [n for n in group if n not in self.classes]
        if unknown:
            raise ValueError(f"class_groups: {unknown} are not among the sampled classes {list(self.classes)}")
        idx = [self.classes.index(n) for n in group]
        found = []
        for i, crop in enumerate(self.crops):
            coords = np.argwhere((crop.labels[idx] == PRESENT).any(0))
            if len(coords):
                found.append((i, coords))
        return found

    def _corner(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        if self.groups and rng.random() < self.balance:
            group = self.groups[rng.integers(len(self.groups))]
            ci, coords = group[rng.integers(len(group))]
            centre = coords[rng.integers(len(coords))]
            planes, na, nb = self.windows[ci]
            in_plane = [c for i, c in enumerate(centre) if i != self.axis]
            jitter = rng.integers(-self.patch // 4, self.patch // 4 + 1, size=2)
            a = int(np.clip(in_plane[0] - self.patch // 2 + jitter[0], 0, na - 1))
            b = int(np.clip(in_plane[1] - self.patch // 2 + jitter[1], 0, nb - 1))
            return ci, int(centre[self.axis]), a, b
        ci = int(rng.integers(len(self.crops)))
        planes, na, nb = self.windows[ci]
        return ci, int(rng.integers(planes)), int(rng.integers(na)), int(rng.integers(nb))

    def sample(self, rng: np.random.Generator, batch_size: int) -> PatchBatch:
        """`batch_size` random patches (class-balanced as configured), augmented if enabled."""
        return self._cut([self._corner(rng) for _ in range(batch_size)], rng if self.augment else None)

    def tiles(self, stride: int | None = None) -> list[tuple[int, int, int, int]]:
        """Every patch position (crop, plane, a, b) on a regular grid with `stride` (default: the patch size),
        the last row and column flush with the border so every voxel is covered once at least."""
        stride = stride or self.patch
        corners = []
        for ci, (planes, na, nb) in enumerate(self.windows):
            rows = sorted({*range(0, na, stride), na - 1})
            cols = sorted({*range(0, nb, stride), nb - 1})
            corners.extend((ci, p, a, b) for p in range(planes) for a in rows for b in cols)
        return corners

    def cut(self, corners: Sequence[tuple[int, int, int, int]]) -> PatchBatch:
        """The patches at given positions (from `tiles`), without augmentation."""
        return self._cut(corners, None)

    def _cut(self, corners: Sequence[tuple[int, int, int, int]], rng: np.random.Generator | None) -> PatchBatch:
        raws, labels, datasets = [], [], []
        for ci, index, a, b in corners:
            crop = self.crops[ci]
            raw = _take_stack(crop.raw, self.axis, index, a, b, self.patch, self.depth)
            lab = _take(crop.labels, self.axis, index, a, b, self.patch)
            if rng is not None:
                if self.elastic:
                    coordinates = elastic_coordinates(self.patch, rng)
                    raw, lab = warp(raw, coordinates, order=1), warp(lab, coordinates, order=0)
                raw, lab = _augment([raw, lab], rng)
            raws.append(raw)
            labels.append(lab)
            datasets.append(self.dataset_ids[crop.dataset])
        return PatchBatch(np.stack(raws).astype(np.float32), np.stack(labels), np.asarray(datasets, np.int64))


class RawPatchSampler:
    """Raw-only patches from whole EM volumes (labelled or not), for the label-free branch of training."""

    def __init__(
        self,
        stores: Sequence[EMStore],
        patch_size: int,
        *,
        voxel_size: Sequence[float] | None = None,
        axis: str = "z",
        augment: bool = True,
        dataset_ids: Mapping[str, int] | None = None,
    ):
        if not stores:
            raise ValueError("stores: no EM stores to sample from")
        self.patch, self.augment, self.axis = patch_size, augment, check_axis(axis)
        self.dataset_ids = dict(dataset_ids or {s.name: i for i, s in enumerate(sorted(stores, key=lambda s: s.name))})
        self.stores = list(stores)
        self.volumes = []
        for store in self.stores:
            volume = store.em_volume(store.em_level(voxel_size))
            if np.prod(volume.shape) * np.dtype(volume.dtype).itemsize < IN_MEMORY_LIMIT:
                volume = np.asarray(volume[...])
            self.volumes.append(volume)
        self.windows = [_plane_window(v.shape, self.axis, patch_size, f"EM of {s.path}")
                        for s, v in zip(self.stores, self.volumes, strict=True)]

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """raw [B,1,H,W] float32 in [-1,1] and dataset ids [B]."""
        raws, datasets = [], []
        for _ in range(batch_size):
            si = int(rng.integers(len(self.stores)))
            planes, na, nb = self.windows[si]
            patch = _take(self.volumes[si], self.axis, int(rng.integers(planes)), int(rng.integers(na)),
                          int(rng.integers(nb)), self.patch)
            raw = self.stores[si].normalize(patch)[None]
            if self.augment:
                (raw,) = _augment([raw], rng)
            raws.append(raw)
            datasets.append(self.dataset_ids[self.stores[si].name])
        return np.stack(raws).astype(np.float32), np.asarray(datasets, np.int64)


def load_crops(
    stores: Sequence[EMStore],
    classes: Sequence[str],
    voxel_size: Sequence[float] | None = None,
    crops: Mapping[str, Sequence[str]] | None = None,
    labelled_slices: int = 0,
    axis: str = "z",
) -> list[LabelledCrop]:
    """Read every crop (or the named `crops[store.name]`) of every store at one voxel size.

    `labelled_slices` > 0 keeps the labels of only that many evenly spaced planes along `axis` per crop and
    marks the rest unannotated (the low-label regime: raw EM everywhere, annotations on a few slices).
    """
    out = []
    for store in stores:
        names = crops.get(store.name, ()) if crops is not None else store.crops
        out.extend(store.read_crop(name, classes, voxel_size) for name in names)
    if labelled_slices:
        for crop in out:
            keep_labelled_slices(crop, labelled_slices, axis)
    return out


def keep_labelled_slices(crop: LabelledCrop, count: int, axis: str = "z") -> None:
    """Mark every plane of `crop` along `axis` unannotated except `count` evenly spaced ones (in place)."""
    if count < 1:
        raise ValueError(f"labelled_slices: {count} must be at least 1 (0 means all)")
    along = check_axis(axis)
    planes = crop.labels.shape[1 + along]
    kept = np.unique(np.linspace(0, planes - 1, min(count, planes)).round().astype(int))
    dropped = np.setdiff1d(np.arange(planes), kept)
    key: list[object] = [slice(None)] * 4
    key[1 + along] = dropped
    crop.labels[tuple(key)] = UNKNOWN
