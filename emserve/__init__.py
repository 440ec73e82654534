"""emserve: diffusion-generated training data for organelle segmentation in volume EM."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def _installed(distribution: str) -> bool:
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


# onnxruntime and onnxruntime-gpu install the same `onnxruntime` package folder: with both present, whichever
# was installed last silently wins and removing either breaks the other. Refuse early and say how to fix it.
if _installed("onnxruntime") and _installed("onnxruntime-gpu"):
    raise ImportError(
        "emserve: both onnxruntime and onnxruntime-gpu are installed; they overwrite each other. Keep exactly one: "
        "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'emserve[cpu]' (or 'emserve[gpu]')"
    )
