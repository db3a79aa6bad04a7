"""Writing an inverse transform in the file type its name asks for (default: next to the input,
in the input's format)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..errors import ConfigError, ShapeError
from ..formats import save_transform, transform_format, write_displacement_field
from ..io import is_nifti_path
from ..transforms import DisplacementField
from .inverse import InverseResult
from .saved import SavedTransform

__all__ = ["save_inverse"]


def _default_inverse_path(st: SavedTransform, inv: InverseResult) -> Path:
    if st.path.is_dir() or not st.path.exists():
        raise ConfigError(f"{st.path}: give the output file with -o")
    name = st.path.name
    if inv.method in ("fixed_point", "stored"):
        suffix = ".nii.gz"
    elif inv.method == "swapped_keypoints":
        suffix = ".json"
    else:
        suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else st.path.suffix
    stem = name[: -len(suffix)] if name.lower().endswith(suffix) else st.path.stem
    return st.path.with_name(f"{stem}_inverse{suffix}")


def save_inverse(inv: InverseResult, saved: SavedTransform, path: str | os.PathLike | None = None) -> Path:
    """Write an inverse; the file type follows ``path`` (default: ``<name>_inverse`` next to the input,
    in the input's format).

    * linear: ``.txt`` (the input's plain-matrix or ITK flavour; ITK for other inputs), ``.tfm``,
      ``.mat``, ``.lta`` (needs both grids) or ``.nii[.gz]`` (sampled as a displacement field);
    * swapped-keypoint TPS: ``.json`` (a ``tps.json`` with the residual) or ``.nii[.gz]``;
    * numerical inverse: ``.nii[.gz]`` (ITK/ANTs displacement field on its grid).

    Raises:
        ConfigError: a file type the inverse cannot be written as, or missing grids.
    """
    out = Path(path) if path is not None else _default_inverse_path(saved, inv)
    name = out.name.lower()
    if is_nifti_path(out):
        grid = inv.fixed_grid
        if grid is None:
            raise ConfigError(f"{out}: writing the inverse as a displacement field needs the moving image's grid; "
                              "pass --moving")
        t = inv.transform
        if not isinstance(t, DisplacementField) or t.shape != grid.shape:
            from ..transforms import sample_field
            t = sample_field(t, grid.shape, grid.affine, stride=1, dtype=torch.float64)
        disp = t.displacement[0].permute(1, 2, 3, 0).float().numpy()
        return write_displacement_field(out, disp, grid.affine, header=grid.header)
    if inv.method == "swapped_keypoints":
        if not name.endswith(".json"):
            raise ConfigError(f"{out}: a TPS inverse is written as .json (tps.json) or .nii.gz (displacement field)")
        return atomic_write_text(out, json.dumps(inv.tps, indent=1) + "\n")
    if inv.method in ("fixed_point", "stored"):
        raise ConfigError(f"{out}: a numerical inverse is a displacement field: use a .nii.gz name")
    try:
        fmt = transform_format(out)
    except ConfigError:
        raise ConfigError(f"{out}: unknown output type (use .txt, .tfm, .mat, .lta or .nii.gz)") from None
    if name.endswith(".txt") and saved.format in ("matrix", "itk"):
        fmt = saved.format
    matrix = inv.transform.matrix[0].double().numpy()  # type: ignore[union-attr]
    if fmt == "lta":
        if inv.fixed_grid is None or inv.moving_grid is None:
            raise ConfigError(f"{out}: an LTA needs both image grids; pass --fixed and --moving")
        return save_transform(out, matrix, fmt="lta", moving_shape=inv.moving_grid.shape,
                              moving_affine=inv.moving_grid.affine, fixed_shape=inv.fixed_grid.shape,
                              fixed_affine=inv.fixed_grid.affine, moving_name=inv.moving_grid.name,
                              fixed_name=inv.fixed_grid.name)
    if fmt not in ("matrix", "itk", "ants"):
        raise ShapeError(f"unexpected format {fmt!r}")
    return save_transform(out, matrix, fmt=fmt)
