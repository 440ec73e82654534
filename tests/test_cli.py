import subprocess
import sys
import textwrap

import numpy as np
import pytest

from emserve.data.writer import CropToWrite, write_store


def emserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emserve.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_of_every_command_explains_itself():
    top = emserve("--help")
    assert top.returncode == 0 and "data" in top.stdout and "train" in top.stdout
    for command in (["data", "phantom"], ["data", "info"], ["train", "ddpm"]):
        result = emserve(*command, "--help")
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout and len(result.stdout.splitlines()) > 8


def test_missing_store_is_one_line_error_with_exit_status_2(tmp_path):
    result = emserve("data", "info", str(tmp_path / "nope.zarr"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.zarr does not exist" in lines[0]
    assert "Traceback" not in result.stderr


def test_store_without_em_group_is_named_in_the_error(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=2)
    result = emserve("data", "info", str(tmp_path / "empty.zarr"))
    assert result.returncode == 2 and "no group recon-1/em" in result.stderr


def test_info_lists_levels_and_crops(tmp_path):
    raw = np.zeros((8, 32, 32), np.uint8)
    mask = np.zeros((4, 8, 8), np.uint8)
    write_store(tmp_path / "a.zarr", raw, (8, 4, 4), [CropToWrite("crop7", (0, 0, 0), {"mito_lum": mask})])
    result = emserve("data", "info", str(tmp_path / "a.zarr"))
    assert result.returncode == 0, result.stderr
    assert "crop7: mito_lum" in result.stdout
    assert "(8, 16, 16)" in result.stdout and "8 x 8 x 8" in result.stdout  # s1: y and x halved to z's 8 nm


def test_both_onnxruntime_builds_installed_is_refused_at_import(tmp_path):
    # A second distribution's metadata next to the real one is exactly what pip leaves behind.
    for name in ("onnxruntime", "onnxruntime_gpu"):
        meta = tmp_path / f"{name}-1.0.0.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.0.0\n")
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(tmp_path)!r})
        import emserve
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "both onnxruntime and onnxruntime-gpu are installed" in result.stderr


def test_import_writes_a_store_with_a_held_out_crop(tmp_path):
    from PIL import Image

    from emserve.data.store import EMStore

    (tmp_path / "em").mkdir()
    (tmp_path / "mito").mkdir()
    rng = np.random.default_rng(0)
    masks = []
    for i in range(5):
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + i: 12 + i, 8:20] = 255
        masks.append(mask > 0)
        image = rng.integers(100, 200, (32, 32), dtype=np.uint8)
        image[mask > 0] = 20
        Image.fromarray(image).save(tmp_path / "em" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "mito" / f"{i}.png")
    result = emserve("data", "import", str(tmp_path / "em"), str(tmp_path / "s.zarr"), "--voxel-size", "50,4,4",
                     "--mask", f"mito={tmp_path / 'mito'}", "--holdout", "2")
    assert result.returncode == 0, result.stderr
    assert "crop2 (test)" in result.stdout
    store = EMStore(tmp_path / "s.zarr")
    test = store.read_crop("crop2", ["mito"])
    assert np.array_equal(test.labels[0] == 1, np.stack(masks[3:]))
    assert store.em_levels[0].voxel_size == (50.0, 4.0, 4.0)

    bad = emserve("data", "import", str(tmp_path / "em"), str(tmp_path / "t.zarr"), "--voxel-size", "50,4",
                  "--mask", f"mito={tmp_path / 'mito'}")
    assert bad.returncode == 2 and "voxel_size" in bad.stderr and not (tmp_path / "t.zarr").exists()


def test_guidance_is_one_scale_or_a_weight_per_condition_and_anything_else_is_refused_saying_how():
    from emserve.cli_options import parse_guidance

    assert parse_guidance("3") == 3.0
    assert parse_guidance("label_map=3, dataset=1.5") == {"label_map": 3.0, "dataset": 1.5}
    for text in ("high", "label_map=", "label_map:3"):
        with pytest.raises(ValueError) as error:
            parse_guidance(text)
        assert str(error.value) == (f"guidance: {text!r} must be a number (e.g. 3) or condition=scale pairs "
                                    f"(e.g. label_map=3,dataset=1.5)")
