"""The `emserve` command. Each sub-command is a thin layer over a library function; errors in the user's input
come back as one line naming what is wrong, with exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Diffusion-generated training data for organelle segmentation in volume EM.\n\n"
    "Stores are OME-NGFF zarr in the CellMap layout (<name>.zarr/recon-1/em/fibsem-uint8, "
    "recon-1/labels/groundtruth/crop<N>/<class>); sizes are in nanometres, axes z, y, x.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Make, import and inspect vEM stores.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, RuntimeError)


def main() -> None:
    """Entry point: run the app, turning input errors into a one-line message and exit status 2."""
    try:
        app()
    except USER_ERRORS as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None


@data_app.command("phantom")
def data_phantom(
    out: Annotated[Path, typer.Argument(help="Folder to write <dataset>.zarr stores and montage PNGs into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes identical stores.")] = 0,
    datasets: Annotated[int, typer.Option(min=1, help="How many datasets (imaging conditions) to make.")] = 3,
    crops: Annotated[int, typer.Option(min=1, help="Labelled 3D crops per dataset.")] = 3,
    overwrite: Annotated[bool, typer.Option(help="Replace stores that already exist.")] = False,
) -> None:
    """Write the embedded default data: procedural EM-like volumes with exact organelle labels.

    Datasets differ like real ones do (contrast, noise, blur, voxel size, organelle density), so domain
    conditioning has something to learn. Open the stores in napari or neuroglancer, or look at the PNGs.
    """
    from emserve.data.phantom import write_phantoms

    paths = write_phantoms(out, seed=seed, datasets=datasets, crops_per_dataset=crops, overwrite=overwrite)
    for path in paths:
        console.print(f"wrote {path}")


@data_app.command("info")
def data_info(
    store: Annotated[str, typer.Argument(help="A <dataset>.zarr or .n5 path, or an s3:// URL.")],
) -> None:
    """Show a store's EM scale levels (voxel size and offset in nm) and its crops with their classes."""
    from emserve.data.store import EMStore

    em = EMStore(store)
    table = Table(title=f"{em.name}: EM {em.em_group_path}")
    for col in ("level", "shape (z,y,x)", "voxel size nm", "offset nm"):
        table.add_column(col)
    for level in em.em_levels:
        table.add_row(level.path, str(tuple(em.em_volume(level).shape)), _nm(level.voxel_size),
                      _nm(level.translation))
    console.print(table)
    if not em.crops:
        console.print("no ground-truth crops (raw only)")
    for crop in em.crops:
        console.print(f"{crop}: {', '.join(em.crop_classes(crop))}")


def _nm(values: tuple[float, ...]) -> str:
    return " x ".join(f"{v:g}" for v in values)


if __name__ == "__main__":
    main()
