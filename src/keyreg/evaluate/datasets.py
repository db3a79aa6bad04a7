"""Evaluation images, each with its segmentation: from a directory pair, a CSV, or label maps with
synthetic contrasts (:mod:`.contrasts`)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ImageContentError, ImageIOError
from ..io import Volume, check_same_grid, load_volume, nifti_stem
from ..pairing import list_nifti, unique_names
from .contrasts import synthesizer
from .seeds import seed_of

__all__ = ["EvalImage", "images_from_directories", "images_from_csv", "images_from_label_maps"]


@dataclass
class EvalImage:
    """One image of the evaluation set with its segmentation.

    Attributes:
        name: unique short name (used in pair names and the CSV).
        subject: images of one subject share it (same anatomy, possibly other modalities).
        modality: contrast name (``t1``, ``t2``, ...).
        image, seg: the image and its label map on the same grid.
        source: where it came from (file path, or ``label map + contrast``).
    """

    name: str
    subject: str
    modality: str
    image: Volume
    seg: Volume
    source: str = ""


def _load_pair(img_path: Path, seg_path: Path, name: str) -> tuple[Volume, Volume]:
    image = load_volume(img_path, kind="image", name=name)
    seg = load_volume(seg_path, kind="labels", name=str(seg_path))
    check_same_grid(seg, image, f"segmentation (of {img_path})")
    seg.name = f"{name}_seg"
    return image, seg


def images_from_directories(images: str | Path, segs: str | Path, *, modality: str = "image",
                            name_pattern: str | None = None) -> list[EvalImage]:
    """Images of a directory with their segmentations (same file names in ``segs``).

    Args:
        modality: modality of every image when ``name_pattern`` does not give one.
        name_pattern: a regular expression searched in each file name (without ``.nii[.gz]``)
            with named groups ``subject`` and/or ``modality`` (e.g.
            ``(?P<subject>IXI\\d+)-.*-(?P<modality>T1|T2|PD)``).  Without it, every file is its
            own subject.
    """
    images, segs = Path(images), Path(segs)
    for p, flag in ((images, "--images"), (segs, "--segs")):
        if not p.is_dir():
            raise ImageIOError(f"{p}: {flag} must be an existing directory")
    regex = _compile(name_pattern)
    out = []
    for path in list_nifti(images):
        seg_path = segs / path.name
        if not seg_path.exists():
            raise ImageIOError(f"{seg_path}: no segmentation for {path} (same file name expected in --segs)")
        name = nifti_stem(path)
        subject, mod = name, modality
        if regex is not None:
            m = regex.search(name)
            if m is None:
                raise ConfigError(f"--name_pattern {name_pattern!r} does not match the file name {path.name!r}")
            groups = m.groupdict()
            subject = groups.get("subject") or subject
            mod = groups.get("modality") or mod
        image, seg = _load_pair(path, seg_path, name)
        out.append(EvalImage(name, subject, mod, image, seg, str(path)))
    return out


def _compile(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--name_pattern {pattern!r} is not a valid regular expression ({e})") from None
    if not {"subject", "modality"} & set(regex.groupindex):
        raise ConfigError(f"--name_pattern {pattern!r} needs a named group (?P<subject>...) or (?P<modality>...)")
    return regex


def _check_distinct(files: Sequence[Path], what: str) -> None:
    """:class:`ConfigError` for a label map listed twice (the same path, a link to it, or a copy: the
    same bytes): it would be counted as two subjects, its pairs with itself as cross-subject pairs."""
    by_size: dict[int, list[Path]] = {}
    for f in files:
        try:
            by_size.setdefault(f.stat().st_size, []).append(f)
        except OSError:
            continue  # a missing file fails with its own error when it is read
    for group in by_size.values():
        seen: dict[str, Path] = {}
        for f in group if len(group) > 1 else ():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if digest in seen:
                raise ConfigError(f"{what} the same file twice: {seen[digest]} and {f}")
            seen[digest] = f


def images_from_csv(path: str | Path) -> list[EvalImage]:
    """Images listed in a CSV with columns ``img_path,seg_path,modality`` (optionally ``subject``).

    The header row is optional when there are exactly those three columns in that order.  Relative
    paths are relative to the CSV's directory.  Without a ``subject`` column, images that share
    a segmentation file are one subject (the same anatomy in several modalities); otherwise each
    segmentation file is its own subject.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageIOError(f"{path}: CSV file does not exist")
    try:
        rows = [r for r in csv.reader(io.StringIO(path.read_text(encoding="utf-8-sig"))) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ImageIOError(f"{path}: cannot read as CSV ({e})") from None
    if not rows:
        raise ConfigError(f"{path}: the CSV is empty")
    first = [c.strip().lower() for c in rows[0]]
    has_header = "img_path" in first
    if has_header:
        header, rows = first, rows[1:]
    else:
        header = ["img_path", "seg_path", "modality"]
    for col in ("img_path", "seg_path", "modality"):
        if col not in header:
            raise ConfigError(f"{path}: the CSV needs the columns img_path,seg_path,modality (missing {col})")
    col = {c: header.index(c) for c in header}
    base = path.parent
    entries = []
    for lineno, r in enumerate(rows, start=2 if has_header else 1):
        if len(r) < len(header):
            raise ConfigError(f"{path}:{lineno}: expected {len(header)} columns, got {len(r)}")
        for c in ("img_path", "seg_path"):
            if not r[col[c]].strip():
                raise ConfigError(f"{path}:{lineno}: empty {c}")
        img = Path(r[col["img_path"]].strip())
        seg = Path(r[col["seg_path"]].strip())
        img, seg = (p if p.is_absolute() else base / p for p in (img, seg))
        subject = r[col["subject"]].strip() if "subject" in col else str(seg.resolve())
        entries.append((img, seg, r[col["modality"]].strip() or "image", subject))
    if not entries:
        raise ConfigError(f"{path}: the CSV lists no image")
    rows_of: dict[Path, int] = {}
    for n, e in enumerate(entries):  # a repeated row would pair an image with itself
        if e[0].resolve() in rows_of:
            raise ConfigError(f"{path}: the CSV lists {e[0]} twice")
        rows_of[e[0].resolve()] = n
    names = unique_names([nifti_stem(e[0]) for e in entries])
    out = []
    for (img, seg, mod, subject), name in zip(entries, names):
        image, segv = _load_pair(img, seg, name)
        out.append(EvalImage(name, subject, mod, image, segv, str(img)))
    return out


def images_from_label_maps(paths: Sequence[str | Path], contrasts: Sequence[str], *, seed: int = 0,
                           stride: int = 1) -> tuple[list[EvalImage], str]:
    """One synthetic image per label map and contrast; the label map is its segmentation.

    Args:
        paths: label map files, or directories of them.
        contrasts: contrast names.  Each name is ONE seeded random draw of the per-label mean
            intensities, shared by all label maps (so ``cross_subject_same_modality`` pairs have the
            same contrast); noise and other per-image effects are drawn per image.  With the
            training generator, ``t1``, ``t2`` and ``pd`` follow those MRI contrasts' tissue means.
        seed: the evaluation seed.
        stride: keep every ``stride``-th voxel of each label map (exact for labels; the affine is
            scaled accordingly), to evaluate quickly at a lower resolution.

    Returns:
        ``(images, synthesizer_name)``.
    """
    if stride < 1:
        raise ConfigError(f"--label_stride must be >= 1, got {stride}")
    if not contrasts:
        raise ConfigError("--contrasts needs at least one contrast name")
    if len(set(contrasts)) != len(contrasts):
        raise ConfigError(f"--contrasts names must be distinct, got {list(contrasts)}")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += list_nifti(p)
        elif p.exists():
            files.append(p)
        else:
            raise ImageIOError(f"{p}: label map does not exist")
    _check_distinct(files, "--label_maps lists")
    subjects = unique_names([nifti_stem(f) for f in files])
    segs = []
    for f, subject in zip(files, subjects):
        seg = load_volume(f, kind="labels", name=subject)
        if stride > 1:
            aff = seg.affine.copy()
            aff[:3, :3] = aff[:3, :3] * stride
            seg = Volume(np.ascontiguousarray(seg.data[::stride, ::stride, ::stride]), aff, None, subject, "labels")
        if not (seg.data != 0).any():
            raise ImageContentError(f"{f}: label map is empty (all background)")
        if int(seg.data.min()) < 0:
            raise ImageContentError(f"{f}: label map has negative ids")
        segs.append(seg)
    draw_means, synthesize, synth_name = synthesizer()
    table = max(int(s.data.max()) for s in segs) + 1
    means = {c: draw_means(table, c, torch.Generator().manual_seed(seed_of(seed, "contrast", c)))
             for c in contrasts}
    out: list[EvalImage] = []
    for f, subject, seg in zip(files, subjects, segs):
        labels_t = torch.from_numpy(seg.data)[None, None]
        for c in contrasts:
            gen = torch.Generator().manual_seed(seed_of(seed, "image", subject, c))
            img = synthesize(labels_t, gen, means[c])
            image = load_volume((img[0, 0].numpy(), seg.affine), kind="image", name=f"{subject}_{c}")
            out.append(EvalImage(f"{subject}_{c}", subject, c, image, seg, f"{f} ({c})"))
    return out, synth_name
