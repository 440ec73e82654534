"""Phantom vEM: procedural FIB-SEM-like volumes with exact organelle labels (the embedded default dataset).

Each phantom dataset is a block of a few cells seen by FIB-SEM: cells separated by plasma membrane, some pairs
with extracellular space between them; one nucleus (double envelope with its lumen, heterochromatin along the
envelope, a nucleolus); mitochondria (capsules at random orientations, double membrane, lamellar cristae, rare
matrix granules); ER tubules and stacked sheets; many small vesicles, a few lipid droplets and microtubules.
Sizes are loosely biological but compressed (a "cell" is 1-2 um across) so a few hundred voxels show several.

Labels are atomic CellMap classes, one id per voxel, so the `all` array is exact. Every shape is built from a
depth map (nm inside its surface, 1-Lipschitz), and a membrane is the band 0 < depth <= T with T at least one
voxel diagonal, so no lumen voxel can touch the outside, even diagonally; a final pass checks that and closes
any gap the wavy cell boundaries leave. The raw EM is rendered from the labels: class intensities (membranes
dark on a lighter cytosol), granular texture and ribosome dots, a Gaussian PSF, gamma, slice-to-slice
brightness jitter, shading, shot noise (Poisson, in its Gaussian form) plus read noise and (in one preset) FIB
curtaining stripes.

Datasets differ the way real acquisitions do: voxel size (8 nm isotropic, 4 nm isotropic, 12 x 6 x 6 nm),
contrast, brightness, gamma, noise, blur and organelle size / density. Crops annotate sub-boxes of a larger EM
volume (the rest is raw-only), chosen to cover rare classes; one crop leaves a class unannotated on purpose.
Everything is a function of (seed, dataset index, shapes): the same seed writes byte-identical arrays.

Modules: `labels` (the annotated classes and their ids), `presets` (imaging and content of each dataset),
`geometry` (the block being built, depth maps, neighbourhood filters), `cells` (cell boundaries, extracellular
space, the nucleus), `organelles` (mitochondria, ER, microtubules, vesicles, lipid droplets), `render` (labels
to EM), `volume` (one dataset in memory), `crops` (which sub-boxes to annotate), `write` (the zarr stores) and
`montage` (the PNG picture of each).
"""

from .crops import choose_crops
from .geometry import Box
from .labels import PHANTOM_CLASSES, RARE_CLASSES
from .montage import montage_image, write_montage
from .presets import PRESETS, Content, DatasetPreset, Imaging, preset_for
from .volume import DEFAULT_SHAPE, PhantomVolume, make_phantom
from .write import DEFAULT_CROP_SHAPE, UNANNOTATED_CANDIDATES, write_phantoms

__all__ = [
    "DEFAULT_CROP_SHAPE",
    "DEFAULT_SHAPE",
    "PHANTOM_CLASSES",
    "PRESETS",
    "RARE_CLASSES",
    "UNANNOTATED_CANDIDATES",
    "Box",
    "Content",
    "DatasetPreset",
    "Imaging",
    "PhantomVolume",
    "choose_crops",
    "make_phantom",
    "montage_image",
    "preset_for",
    "write_montage",
    "write_phantoms",
]
