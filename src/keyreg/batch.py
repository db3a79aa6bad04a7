"""The batch runner behind ``keyreg register``: pairing, torchrun sharding, resume, atomic pair
directories, the failure policy and the summary tables.

* **Pairing**: :func:`keyreg.pairing.build_pairs` (files, directories paired by name, ``all_pairs``).
* **Sharding**: under ``torchrun`` each rank takes ``pairs[rank::world]``; rank 0 gathers every
  rank's rows (gloo, Python objects only) and writes the tables.
* **Atomic pair directories**: everything of a pair is written into a hidden temporary directory
  renamed to ``pairs/<pair>`` at the end; ``done.json`` is written last.
* **Resume** (``skip_existing``): a pair whose ``done.json`` records the same inputs (path, size and
  modification time of every file), the same model (a hash of its weights and configuration) and the
  same options is not redone.  Hidden temporaries left by a killed run are removed first.
* **Lock**: one run at a time per output directory and rank (``flock`` on ``.keyreg-<rank>.lock``;
  released by the kernel when a process dies), so two runs never interleave their outputs.
* **Failure policy**: a single pair raises its error (the CLI prints one line, exit 2).  In a batch,
  ANY exception of a pair is recorded and the batch goes on; the tables are always written and list
  the failures (the CLI exits 1).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, check_inputs_outside, remove_stale_temporaries
from .distributed import distributed_env
from .errors import ConfigError, OutputError, failure_message
from .pairing import Pair, build_pairs
from .writer import BackgroundWriter

__all__ = ["BatchResult", "run_batch", "register_batch", "distributed_env", "json_clean", "file_identity",
           "model_fingerprint", "output_lock", "write_metric_tables", "format_summary", "scalar_metrics",
           "write_batch_report"]


# ------------------------------------------------------------------------------------------ helpers

def json_clean(v: Any) -> Any:
    """``v`` with non-finite floats as ``None`` and keys as strings (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_clean(x) for x in v]
    return v


def file_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """``{"path", "size", "mtime_ns"}`` of a file: replacing or editing it changes the identity."""
    if path is None:
        return None
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "size": None, "mtime_ns": None}
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_fingerprint(model) -> str:
    """SHA-256 of a model's configuration and weights: equal for the same model however it was named."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def output_lock(directory: Path, rank: int = 0) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` for this rank; :class:`OutputError` if another run holds it."""
    import fcntl

    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / f".keyreg-{rank}.lock"
        f = open(lock, "a+")
    except OSError as e:
        raise OutputError(f"{directory}: cannot write here ({e.strerror or e})") from None
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"{directory}: another keyreg run is writing into this directory "
                              f"(wait for it, or choose another output directory)") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                lock.unlink()
    finally:
        f.close()
        if created:  # a run that wrote nothing leaves nothing behind
            with contextlib.suppress(OSError):
                directory.rmdir()


# ------------------------------------------------------------------------------------------ tables

#: per-pair facts of a row, in metrics.csv beside the pair's names, not averaged in summaries
PAIR_FACTS = ("flag", "flag_reason", "already_aligned", "orientation_searched")


def scalar_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in PAIR_FACTS}


def format_summary(rows: Sequence[dict], aligns: Sequence[str]) -> str:
    """A markdown table: one row per align (``none`` first: before registration, when measured),
    ``mean ± std`` (over pairs) per scalar metric."""
    names: list[str] = []
    for r in rows:
        for k in scalar_metrics(r):
            if k not in names:
                names.append(k)
    lines = ["| align | pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for align in ["none", *aligns]:  # none: before registration
        sel = [r for r in rows if r["align"] == align]
        if not sel:
            continue
        cells = []
        for n in names:
            vals = [float(r[n]) for r in sel if n in r and r[n] is not None and not math.isnan(float(r[n]))]
            if not vals:
                cells.append("n/a")
                continue
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            cells.append(f"{mean:.4f} ± {std:.4f}" if len(vals) > 1 else f"{mean:.4f}")
        lines.append(f"| {align} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_metric_tables(save_dir: Path, rows: Sequence[dict],
                        failures: Sequence[tuple[str, str]] = ()) -> tuple[Path, Path]:
    """``metrics.csv`` (one row per pair and align, scalar metrics) and ``metrics.json`` (everything,
    per-label values and failures included), both written atomically."""
    keys = ["pair", "moving", "fixed", "align"] + [k for k in PAIR_FACTS if any(k in r for r in rows)]
    for r in rows:
        for k in scalar_metrics(r):
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in keys})
    csv_path = atomic_write_text(save_dir / "metrics.csv", buf.getvalue())
    doc = {"results": [json_clean(dict(r)) for r in rows],
           "failures": [{"pair": n, "error": e} for n, e in failures]}
    json_path = atomic_write_text(save_dir / "metrics.json", json.dumps(doc, indent=1) + "\n")
    return csv_path, json_path


# ------------------------------------------------------------------------------------------ runner

@dataclass
class BatchResult:
    """What a batch did (this rank's view, merged over ranks on rank 0).

    Attributes:
        rows: one dict per (pair, align): ``pair, moving, fixed, align`` and the metrics.
        failures: ``(pair, message)`` of the pairs that failed.
        skipped: pairs reused from a previous run (``skip_existing``).
        pairs: number of pairs in the whole batch; ``mine``: of this rank.
        tables: paths of ``metrics.csv`` / ``metrics.json`` (rank 0), else ``None``.
        rank, world: torchrun rank and size.
        seconds: wall time per stage on this rank.
        warnings: pairing warnings (unmatched files).
        description: model, aligns and device.
    """

    rows: list[dict] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    pairs: int = 0
    mine: int = 0
    tables: tuple[Path, Path] | None = None
    rank: int = 0
    world: int = 1
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    description: str = ""
    aligns: list[str] = field(default_factory=list)
    report: Path | None = None

    @property
    def flagged(self) -> list[str]:
        """Pairs flagged ``check`` (confidence below its threshold, or :func:`keyreg.qc.detection_concerns`), in
        batch order."""
        return list(dict.fromkeys(r["pair"] for r in self.rows if r.get("flag") == "check"))


def _pair_config(pair: Pair, registrar, metrics: list[str], fingerprint: str, write_images: bool,
                 visualize: bool) -> dict:
    """What a finished pair directory must record to be reused by ``skip_existing``."""
    inputs = {"moving": file_identity(pair.moving), "fixed": file_identity(pair.fixed),
              "moving_seg": file_identity(pair.moving_seg), "fixed_seg": file_identity(pair.fixed_seg)}
    if pair.fixed_mask is not None:
        inputs["fixed_mask"] = file_identity(pair.fixed_mask)
    return {"inputs": inputs,
            "model": fingerprint, "options": registrar.options.to_dict(), "metrics": metrics,
            "save_eval_to_disk": write_images, "visualize": visualize,
            "none_row": True}  # rows written before the none row (the pair before registration) are redone


def _completed(pair_dir: Path, config: dict) -> list[dict] | None:
    """The metric rows of a finished pair (``done.json`` with the same config), else ``None``."""
    try:
        done = json.loads((pair_dir / "done.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("config") != json_clean(config) or not isinstance(done.get("rows"), list):
        return None
    return done["rows"]


def run_batch(
    registrar,
    pairs: Sequence[Pair],
    *,
    save_dir: str | os.PathLike,
    metrics: Sequence[str] | None = None,
    save_eval_to_disk: bool = False,
    visualize: bool = False,
    skip_existing: bool = False,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BatchResult:
    """Register, measure and (optionally) save every pair of this rank's shard.

    Args:
        registrar: a :class:`~keyreg.pipeline.Registrar`.
        pairs: the whole batch (every rank passes the same list).
        metrics: metric names (default: ``mse``, plus ``harddice`` when pairs have segmentations, plus
            ``jdstd`` and ``jdlessthan0`` with a refinement).
        save_eval_to_disk, visualize: write per-pair files / QC figures under ``save_dir/pairs``.
        skip_existing: reuse finished pair directories (see the module docstring).
        rank, world: torchrun rank and size (:func:`distributed_env`).
        progress: a progress bar on stderr (batches only).
        log: called with one line per finished or failed pair (default: stderr).

    Returns:
        A :class:`BatchResult`; on rank 0 ``tables`` are written (always, for a batch).
    """
    from tqdm import tqdm

    from .metrics import parse_metrics

    if not pairs:
        raise ConfigError("no pairs to register")
    has_seg = any(p.moving_seg and p.fixed_seg for p in pairs)
    default = ["mse", "harddice"] if has_seg else ["mse"]
    if registrar.options.refine:  # refined fields: their folding next to the keypoint aligns
        default += ["jdstd", "jdlessthan0"]
    metric_names = parse_metrics(list(metrics) if metrics else default)
    aligns = registrar.options.result_names
    if any(p.fixed_mask is not None for p in pairs):
        registrar.options.check_mask_use()
    save_dir = Path(save_dir)
    single = len(pairs) == 1 and world == 1  # a single pair fails with its error; a batch goes on
    mine = list(range(rank, len(pairs), world))
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    emit = log or (lambda line: tqdm.write(line, file=sys.stderr))
    write_pairs = save_eval_to_disk or visualize or skip_existing
    out = BatchResult(pairs=len(pairs), mine=len(mine), rank=rank, world=world, aligns=aligns)

    # validate the model before anything is written (a bad model file fails the run with one line)
    registrar.model  # noqa: B018 - loads it
    with output_lock(save_dir, rank):
        out.description = registrar.describe()
        if not single:
            emit(f"{tag}{len(mine)} of {len(pairs)} pair(s), {out.description}")
        # recorded by every run that writes pair directories, so that a later skip_existing run can reuse them
        fingerprint = model_fingerprint(registrar.model) if write_pairs else ""
        if skip_existing:
            remove_stale_temporaries(save_dir / "pairs", [pairs[i].name for i in mine])
        results: list[tuple[int, list[dict]]] = []
        failures: list[tuple[int, str, str]] = []
        thumbs: dict[str, bytes] = {}
        bar = tqdm(mine, desc=f"{tag}pairs", unit="pair", file=sys.stderr, dynamic_ncols=True,
                   disable=single or not progress)
        # outputs are written on a background thread while the next align or pair is computed (at most
        # one step - one align's files - waits to be written); a single pair's write error is raised
        writer = BackgroundWriter(max_pending=1) if write_pairs else None
        deferred = _DeferredWrites(writer) if writer is not None else None
        written: dict[int, list[dict]] = {}  # rows of computed pairs whose directory is not committed yet
        failed: set[int] = set()

        def fail(index: int, error: BaseException) -> None:
            written.pop(index, None)
            if index not in failed:
                failed.add(index)
                msg = failure_message(error)
                failures.append((index, pairs[index].name, msg))
                emit(f"{tag}FAILED {pairs[index].name}: {msg}")

        def collect(outcomes) -> None:
            for o in outcomes:  # keys (pair index, whether the step committed the pair directory)
                index, last = o.key
                if o.error is not None and (single or not isinstance(o.error, Exception)):
                    raise o.error  # a single pair's error, or an interrupt (it stops the batch)
                if o.error is not None:
                    fail(index, o.error)
                elif last and index in written:
                    results.append((index, written.pop(index)))

        try:
            for index in bar:
                pair = pairs[index]
                pair_dir = save_dir / "pairs" / pair.name
                config = _pair_config(pair, registrar, metric_names, fingerprint, save_eval_to_disk, visualize) \
                    if write_pairs else {}
                if skip_existing:
                    done = _completed(pair_dir, config)
                    if done is not None:
                        results.append((index, done))
                        out.skipped += 1
                        continue
                start = time.perf_counter()
                if deferred is not None:
                    deferred.index = index
                try:
                    rows, per_align = _one_pair(registrar, pair, metric_names, pair_dir, config, write_pairs,
                                                save_eval_to_disk, visualize, thumbs, deferred=deferred)
                except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: record it, keep going
                    if single:
                        raise
                    fail(index, e)
                    continue
                if writer is None or not write_pairs:
                    results.append((index, rows))
                elif index not in failed:
                    written[index] = rows
                if writer is not None:
                    collect(writer.finished())
                summary = "  ".join(f"{a}: " + " ".join(f"{k}={v:.4f}" for k, v in vals.items()
                                                        if isinstance(v, float))
                                    for a, vals in per_align.items())
                if not single:
                    emit(f"{tag}{pair.name} ({time.perf_counter() - start:.1f} s)  {summary}")
            if writer is not None:
                collect(writer.close())
        finally:
            if writer is not None:  # interrupted: the step being written ends, queued ones never start,
                writer.close(cancel=True)  # and the pair directories they belonged to are discarded
                deferred.abort_open()
        bar.close()
        out.seconds = dict(registrar.timer.seconds)

        if world > 1:
            results, failures, out.skipped = _gather(world, results, failures, out.skipped)
        results.sort(key=lambda r: r[0])
        failures.sort(key=lambda f: f[0])
        out.rows = [row for _, pair_rows in results for row in pair_rows]
        out.failures = [(name, msg) for _, name, msg in failures]
        if rank == 0 and (out.rows or not single):
            out.tables = write_metric_tables(save_dir, out.rows, out.failures)
        if rank == 0 and out.rows:
            out.report = write_batch_report(save_dir, out.rows, out.failures, thumbs, out.description)
    return out


def write_batch_report(save_dir: Path, rows: Sequence[dict], failures: Sequence[tuple[str, str]],
                       thumbs: dict[str, bytes], description: str = "") -> Path:
    """``report.html`` of a batch (:mod:`keyreg.report`): one row per pair, flagged pairs first;
    thumbnails from ``thumbs`` or ``pairs/<pair>/thumbnail.png``; figures from ``pairs/<pair>/``."""
    from .qc import pair_record
    from .report import PairRecord, thumbnail_data_uri, write_report
    from .transforms.residuals import CONFIDENCE_THRESHOLD

    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    records = []
    for name, pair_rows in by_pair.items():
        pair_dir = save_dir / "pairs" / name
        rec = pair_record(name, pair_rows, pair_dir if pair_dir.is_dir() else None, save_dir)
        png = thumbs.get(name)
        if png is None and (pair_dir / "thumbnail.png").is_file():
            png = (pair_dir / "thumbnail.png").read_bytes()
        if png is not None:
            rec.thumbnail = thumbnail_data_uri(png)
        records.append(rec)
    records += [PairRecord(name=n, flagged=True, note=f"FAILED: {e}") for n, e in failures]
    # nothing run-specific (paths, times) in the page: the same inputs give the same bytes
    return write_report(save_dir / "report.html", records, title="keyreg report",
                        summary=description + ".", threshold=CONFIDENCE_THRESHOLD)


def _one_pair(registrar, pair: Pair, metrics: list[str], pair_dir: Path, config: dict, write_pairs: bool,
              write_images: bool, visualize: bool, thumbs: dict[str, bytes] | None = None, *,
              deferred: "_DeferredWrites | None" = None) -> tuple[list[dict], dict]:
    """Register, measure and (``write_pairs``) write one pair, streaming align by align
    (:meth:`~keyreg.pipeline.Registrar.stream`): each align is warped, measured and written, and its
    full-grid arrays dropped, before the next one, so that at most one align's arrays (plus one being
    written) are held.

    The pair directory is a :class:`~keyreg.writer.StagedDir`: everything goes to a temporary
    directory renamed to ``pairs/<pair>`` at the end, ``done.json`` last, so an interrupted or failed
    pair never looks complete.  Its steps run in line, or (``deferred``) on the batch's
    :class:`~keyreg.writer.BackgroundWriter` while the next align or pair is computed.  On any error the directory is discarded and the error raised."""
    from .export import save_pair_alignment, save_pair_keypoints, save_pair_residual_plot
    from .metrics import before_metrics
    from .writer import StagedDir

    both = pair.moving_seg is not None and pair.fixed_seg is not None
    if write_pairs:
        check_inputs_outside(pair_dir, [pair.moving, pair.fixed, pair.moving_seg, pair.fixed_seg, pair.fixed_mask])
    reg = registrar.register(pair.moving, pair.fixed, moving_seg=pair.moving_seg if both else None,
                             fixed_seg=pair.fixed_seg if both else None, fixed_mask=pair.fixed_mask,
                             moving_key=_key(pair.moving), fixed_key=_key(pair.fixed), warp=False)
    conf = reg.confidence
    staged = StagedDir(pair_dir) if write_pairs else None
    if staged is not None and deferred is not None:
        deferred.dirs.append(staged)
    files = write_images or visualize

    def step(fn: Callable[[Path], Any], last: bool = False) -> None:
        def job() -> None:
            try:
                with registrar.timer("write"):
                    staged.run(fn)
                if last:
                    staged.commit()
            except BaseException:
                staged.abort()
                raise

        if deferred is None:
            job()
        else:
            deferred.submit(job, last)

    png: list[bytes] = []

    def each(res) -> None:
        if thumbs is not None and not png and res.warped is not None and res is next(iter(reg)):
            from .report import overlay_thumbnail

            png.append(overlay_thumbnail(reg.fixed, res.warped))
            thumbs[pair.name] = png[0]
        if staged is not None and files:
            res = copy.copy(res)  # the job keeps this align's arrays; the pipeline drops them from ``reg``
            step(lambda tmp: save_pair_alignment(res, tmp, write_images=write_images, visualize=visualize))

    try:
        if staged is not None and files:
            step(lambda tmp: save_pair_keypoints(reg, tmp))
        before = before_metrics(metrics) if both else []  # with segmentations: a none row
        per_align = registrar.stream(reg, metrics, each=each, before=before)
        rows = [{"pair": pair.name, "moving": str(pair.moving), "fixed": str(pair.fixed), "align": align, **conf,
                 **({"already_aligned": reg.alignment_check["already_aligned"]} if reg.alignment_check else {}),
                 **vals}
                for align, vals in per_align.items()]
        if staged is not None:
            def finish(tmp: Path) -> None:
                if visualize:
                    save_pair_residual_plot(reg, tmp)
                if files and png:
                    (tmp / "thumbnail.png").write_bytes(png[0])
                atomic_write_text(tmp / "done.json", json.dumps(
                    {"config": json_clean(config), "rows": json_clean(rows)}, indent=1) + "\n")

            step(finish, last=True)
    except BaseException:
        if staged is not None:
            if deferred is None:
                staged.abort()
            else:  # after the steps already handed to the writer (or by abort_open if they never run)
                deferred.submit(staged.abort, True)
        raise
    return rows, per_align


class _DeferredWrites:
    """The steps of pair directories (:class:`~keyreg.writer.StagedDir`) handed to a batch's
    :class:`~keyreg.writer.BackgroundWriter`, keyed ``(pair index, last)``."""

    def __init__(self, writer: BackgroundWriter) -> None:
        self.writer = writer
        self.index = -1
        self.dirs: list[Any] = []

    def submit(self, job: Callable[[], Any], last: bool) -> None:
        """Queue one step of the current pair (blocks while the previous step is being written)."""
        self.dirs = [d for d in self.dirs if not d.closed]
        self.writer.submit((self.index, last), job)

    def abort_open(self) -> None:
        """Discard the pair directories whose last step never ran (call after the writer stopped)."""
        for d in self.dirs:
            d.abort()
        self.dirs = []


def _key(path: Path) -> tuple:
    ident = file_identity(path) or {}
    return ("file", ident.get("path"), ident.get("size"), ident.get("mtime_ns"))


def _gather(world: int, results, failures, skipped):
    """Every rank sends its shard; all get the merged lists (gloo, Python objects)."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (results, failures, skipped))
        dist.barrier()
    finally:
        if own:
            dist.destroy_process_group()
    return ([r for part in gathered for r in part[0]], [f for part in gathered for f in part[1]],
            sum(part[2] for part in gathered))


def register_batch(
    moving: str | os.PathLike,
    fixed: str | os.PathLike,
    *,
    moving_seg: str | os.PathLike | None = None,
    fixed_seg: str | os.PathLike | None = None,
    all_pairs: bool = False,
    fixed_mask: str | os.PathLike | None = None,
    model: Any = None,
    device: str | None = "auto",
    backbone: str | None = None,
    num_keypoints: int | None = None,
    options: Any = None,
    **batch_kwargs: Any,
) -> BatchResult:
    """Pair the inputs, build a :class:`~keyreg.pipeline.Registrar` for this rank's device (one GPU per
    rank under torchrun) and :func:`run_batch` them: what ``keyreg register`` does.  Progress bars of
    the refinement stage are shown when ``progress`` (default on) and stderr is a terminal."""
    from .pipeline import Registrar, resolve_device

    pairs, warnings = build_pairs(moving, fixed, moving_seg, fixed_seg, all_pairs=all_pairs, fixed_mask=fixed_mask)
    rank, world, local_rank = distributed_env()
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda" and dev.index is None:  # one GPU per rank
        import torch

        dev = resolve_device(f"cuda:{local_rank % max(1, torch.cuda.device_count())}")
    registrar = Registrar(model, device=dev, options=options, backbone=backbone, num_keypoints=num_keypoints,
                          progress=batch_kwargs.get("progress", True) and sys.stderr.isatty())
    if rank == 0:
        log = batch_kwargs.get("log") or (lambda line: print(line, file=sys.stderr))
        for w in warnings:
            log(f"warning: {w}")
    result = run_batch(registrar, pairs, rank=rank, world=world, **batch_kwargs)
    result.warnings = warnings
    return result
