"""Which moving image goes with which fixed image (files or directories)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ImageIOError

__all__ = ["Pair", "build_pairs", "list_nifti", "pair_name", "unique_names"]


@dataclass(frozen=True)
class Pair:
    moving: Path
    fixed: Path
    moving_seg: Path | None = None
    fixed_seg: Path | None = None
    fixed_mask: Path | None = None

    @property
    def name(self) -> str:
        return pair_name(self.moving, self.fixed)


#: Kinds of evaluation pairs (``keyreg evaluate``).
PAIR_KINDS = ("same_subject_cross_modality", "cross_subject_same_modality", "cross_subject_cross_modality")


def pair_name(moving: Path, fixed: Path) -> str:
    """``<moving>_to_<fixed>`` from the file names (without ``.nii[.gz]``)."""
    from .io import nifti_stem

    m, f = nifti_stem(moving), nifti_stem(fixed)
    return m if m == f and moving != fixed else f"{m}_to_{f}"


def unique_names(names: Sequence[str]) -> list[str]:
    """``names`` made unique, order kept: the first of equal names keeps it, the next ones get
    ``_2``, ``_3``, ... (skipping any name already given or still to come), so output names of
    inputs with one file name stem (from several directories) never collide."""
    taken = set(names)
    out: list[str] = []
    used: set[str] = set()
    for n in names:
        cand, k = n, 2
        while cand in used or (cand != n and cand in taken):
            cand, k = f"{n}_{k}", k + 1
        used.add(cand)
        out.append(cand)
    return out


def list_nifti(directory: Path) -> list[Path]:
    """Image files (NIfTI, MGZ) directly in ``directory``, sorted by name.

    Raises:
        ImageIOError: none there.  ConfigError: two files with one name stem (``a.nii`` and
            ``a.nii.gz``), whose outputs would overwrite each other.
    """
    from .io import is_image_path, nifti_stem

    # a broken link is listed: its pair then fails with the reading error, instead of the image vanishing
    files = sorted(p for p in directory.iterdir() if (p.is_file() or (p.is_symlink() and not p.exists()))
                   and is_image_path(p))
    if not files:
        raise ImageIOError(f"{directory}: no .nii, .nii.gz or .mgz files in this directory")
    seen: dict[str, Path] = {}
    for f in files:
        stem = nifti_stem(f)
        if stem in seen:
            raise ConfigError(f"{directory}: {seen[stem].name} and {f.name} have the same name {stem!r}; their "
                              f"outputs would overwrite each other (rename or remove one)")
        seen[stem] = f
    return files


def _kind(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    if not path.exists():
        raise ImageIOError(f"{path}: {flag} does not exist")
    return "dir" if path.is_dir() else "file"


def build_pairs(
    moving: str | Path,
    fixed: str | Path,
    moving_seg: str | Path | None = None,
    fixed_seg: str | Path | None = None,
    *,
    all_pairs: bool = False,
    fixed_mask: str | Path | None = None,
) -> tuple[list[Pair], list[str]]:
    """Build the list of pairs to register and a list of warnings (unmatched files).

    * two files: one pair;
    * two directories: files with identical names are paired (sorted by name); with ``all_pairs``
      every moving image is paired with every fixed image (an image is not paired with itself);
    * segmentations and the fixed mask (of the dense refinement): files for file inputs, directories
      (same file names; a mask has the name of its fixed image) for directory inputs;
    * a file paired with a directory is an error.
    """
    moving, fixed = Path(moving), Path(fixed)
    ms = None if moving_seg is None else Path(moving_seg)
    fs = None if fixed_seg is None else Path(fixed_seg)
    fm = None if fixed_mask is None else Path(fixed_mask)
    km, kf = _kind(moving, "--moving"), _kind(fixed, "--fixed")
    if km != kf:
        raise ConfigError(f"--moving is a {km} but --fixed is a {kf}: give two files or two directories")
    for seg, flag in ((ms, "--moving_seg"), (fs, "--fixed_seg"), (fm, "--fixed_mask")):
        k = _kind(seg, flag)
        if k is not None and k != km:
            raise ConfigError(f"{flag} must be a {km} like --moving and --fixed, got a {k}")
    if km == "file":
        if all_pairs:
            raise ConfigError("--all_pairs needs directories for --moving and --fixed")
        return [Pair(moving, fixed, ms, fs, fm)], []

    warnings: list[str] = []
    mov_files, fix_files = list_nifti(moving), list_nifti(fixed)

    def seg_for(seg_dir: Path | None, img: Path, what: str = "segmentation") -> Path | None:
        if seg_dir is None:
            return None
        p = seg_dir / img.name
        if not p.exists():
            warnings.append(f"no {what} {p} for {img}")
            return None
        return p

    pairs: list[Pair] = []
    if all_pairs:
        for m in mov_files:
            for f in fix_files:
                if m.resolve() != f.resolve():
                    pairs.append(Pair(m, f, seg_for(ms, m), seg_for(fs, f), seg_for(fm, f, "fixed mask")))
    else:
        fixed_by_name = {f.name: f for f in fix_files}
        for m in mov_files:
            f = fixed_by_name.pop(m.name, None)
            if f is None:
                warnings.append(f"moving {m.name} has no fixed image of the same name")
                continue
            pairs.append(Pair(m, f, seg_for(ms, m), seg_for(fs, f), seg_for(fm, f, "fixed mask")))
        warnings += [f"fixed {n} has no moving image of the same name" for n in sorted(fixed_by_name)]
    if not pairs:
        raise ConfigError(f"no pairs to register between {moving} and {fixed} "
                          f"(directories are paired by identical file names; see --all_pairs)")
    return pairs, list(dict.fromkeys(warnings))
