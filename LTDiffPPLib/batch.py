"""Cohort-scale standardization: every CT series below a folder (or in a list) to one target kernel.

``ltdiffpp batch INPUT OUTPUT --target-kernel NAME`` is a thin layer over :func:`run_batch`. The work:

1. **Index** (headers only, :func:`index_inputs`): DICOM series anywhere below INPUT (folders of any depth,
   CD exports with a DICOMDIR, files with or without ``.dcm``; a series split over several folders is read
   as one), image files (``.nrrd .nhdr .nii .nii.gz .mha .mhd``), or the inputs a CSV/JSON list names.
   Each series is decided **convert** (a source kernel the header names, or one to estimate from the image,
   that differs from the target), **skip** (already the target kernel; not CT; a localizer) or **fail**
   (unreadable headers; a kernel no model converts) — always with the reason.
2. **Convert** (:func:`run_worker`): per worker the model is loaded once (one per kernel pair, cached);
   a reader thread reads and plans the next series (:func:`LTDiffPPLib.guard.plan_conversion`, the same
   domain guard as ``standardize``) while the current one converts
   (:func:`LTDiffPPLib.inference.standardize_volume`), and a writer thread writes the previous one
   (atomically, :func:`LTDiffPPLib.io.write_volume`) and measures its quality control numbers
   (:mod:`LTDiffPPLib.qc`).
3. **Record**: one JSON line per series in ``OUTPUT/manifest.jsonl`` (:data:`MANIFEST_FIELDS`), appended
   and flushed to disk as each series finishes, so a run killed at any moment loses at most the series in
   flight; a rerun converts only what is not ``done``. At the end the manifest is rewritten (atomically)
   with one line per series, and ``OUTPUT/report.html`` summarizes the quality control.

Outputs mirror the input tree under OUTPUT (:func:`output_path_for`). One batch at a time writes an OUTPUT
(:func:`LTDiffPPLib.io.output_lock`); finished outputs are never rewritten without ``overwrite``; inputs
are never modified (OUTPUT may not lie inside INPUT, nor hold it).

Scaling out: ``--workers N`` runs N local worker processes (default: one per GPU where there are several
GPUs, else 1). Under ``torchrun`` rank 0 alone checks, locks, indexes and resumes, then broadcasts the work
(torch.distributed, gloo); the series are sharded across ranks by slice count (each exactly once), each
rank appends to its own ``manifest.part{rank}.jsonl``, and rank 0 merges them at the end.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import queue
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import InputError, LTDiffPPError, OutputError
from .io import check_not_input, output_lock
from .io.dicom_read import looks_like_dicom
from .io.formats import IMAGE_EXTENSIONS, _image_ext

MANIFEST = "manifest.jsonl"
REPORT = "report.html"
#: the fields every manifest line has (``docs`` in README "Cohort in, cohort out")
MANIFEST_FIELDS = ("key", "input", "status", "reason", "series_uid", "source_kernel", "source_kernel_how",
                   "target_kernel", "model", "model_sha256", "precision", "warnings", "seconds", "slices", "output",
                   "timing", "qc", "run", "host", "shard", "finished")
STATUSES = ("done", "skipped", "failed")

#: Models whose bfloat16 output was measured against float32 on the real test1 slice and the held-out
#: simulated volume (docs/RESULTS.md, "Sampling steps, solver and precision"): mean CCC within 0.002.
#: ``precision="auto"`` uses bfloat16 on a CPU with native bf16 instructions only for these (by SHA-256).
BF16_MEASURED = {
    "d0fd990e7d383490ad824d5338d341922f81187fbb24605eb4c269c9402303ec":
        "ltdiffpp-b30f-b70f: mean CCC +0.002 on test1 and 0.000 on the held-out volume against float32",
}

# ------------------------------------------------------------------------------------------------ index
@dataclass
class BatchItem:
    """One input series and what the batch decided for it (from its headers only).

    ``key`` identifies it across runs (the input's path relative to the cohort root, plus ``#`` and the
    SeriesInstanceUID for DICOM); ``input`` is the series' folder or the image file; ``files``: the series'
    DICOM files when they are not all in one folder (a split CD export), else empty; ``decision`` is
    ``"convert"``, ``"skip"`` or ``"fail"`` with ``reason``; ``source_kernel`` / ``source_kernel_how``:
    the library kernel the header (or the user) names, or None when it is to be estimated from the image;
    ``slices``: number of slices (z) from the headers.
    """

    key: str
    input: str
    kind: str  # "dicom" | "image"
    decision: str
    reason: str = ""
    series_uid: str = ""
    files: list[str] = field(default_factory=list)
    slices: int = 0
    source_kernel: str | None = None
    source_kernel_how: str = ""
    given_source_kernel: str | None = None
    output: str = ""
    description: str = ""


def _image_slices(path: Path) -> tuple[int, dict[str, str]]:
    """Number of slices and the header fields of an image file (header only, no voxels read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read the image header ({' '.join(str(exc).split())[:200]})") from exc
    size = reader.GetSize()
    meta = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
    return (int(size[2]) if len(size) > 2 else 1), meta


@dataclass
class _ListEntry:
    path: Path
    source_kernel: str | None = None
    series_uid: str | None = None


def read_input_list(path: str | os.PathLike) -> list[_ListEntry]:
    """The inputs a CSV or JSON list names (paths relative to the list's folder).

    CSV: a header row with an ``input`` column and optional ``source_kernel`` and ``series_uid`` columns
    (or no header: one path per line). JSON: a list of paths, or of objects with those keys.
    """
    path = Path(path)
    base = path.resolve().parent
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the input list ({exc})") from exc
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of paths or of objects with an 'input' key")
        for i, entry in enumerate(data):
            if isinstance(entry, str):
                entry = {"input": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("input"), str) or not entry["input"]:
                raise InputError(f"{path}: entry {i} has no 'input' path")
            rows.append(entry)
    else:
        lines = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if lines and "input" in [c.strip().lower() for c in lines[0]]:
            head = [c.strip().lower() for c in lines[0]]
            rows = [dict(zip(head, (c.strip() for c in r))) for r in lines[1:]]
        else:
            rows = [{"input": r[0].strip()} for r in lines]
        for i, r in enumerate(rows):
            if not r.get("input"):
                raise InputError(f"{path}: row {i + 2} has an empty 'input' column")
    if not rows:
        raise InputError(f"{path}: the input list is empty")
    out = []
    for r in rows:
        p = Path(os.path.expanduser(str(r["input"])))
        out.append(_ListEntry(p if p.is_absolute() else base / p, (r.get("source_kernel") or None),
                              (r.get("series_uid") or None)))
    return out


def _walk(root: Path, exclude: Path | None) -> Iterable[tuple[Path, list[Path]]]:
    """(folder, its non-hidden files) for every folder below ``root`` (sorted, links not followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        yield here, [here / f for f in sorted(filenames) if not f.startswith(".")]


def index_inputs(input_path: str | os.PathLike, output: str | os.PathLike, target_kernel: str, *,
                 source_kernel: str | None = None, model: str | os.PathLike | None = None) -> list[BatchItem]:
    """Find every series below ``input_path`` (a folder tree, or a ``.csv`` / ``.json`` list of inputs) and
    decide, from headers only, whether to convert, skip or fail it; each item's ``output`` is set.

    ``source_kernel`` stands for inputs whose header names no kernel (image files, anonymized DICOM); a
    list's ``source_kernel`` column overrides it per input. ``model``: a model file or name given by the
    user (then no registered model is looked up). Raises :class:`InputError` when ``input_path`` does not
    exist or names nothing to index.
    """
    from .kernels import get_kernel

    root = Path(input_path)
    if not root.exists():
        raise InputError(f"{root} does not exist; pass a folder of CT series or a .csv/.json list of inputs")
    target = get_kernel(target_kernel)  # an unknown target is a usage error, before any work
    if source_kernel:
        get_kernel(source_kernel)
    out_root = Path(output).resolve()
    if root.is_file():
        if root.suffix.lower() not in (".csv", ".json"):
            if _image_ext(root) is None:
                raise InputError(f"{root}: a batch input is a folder, a .csv/.json list, or an image file "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            entries, base = [_ListEntry(root.resolve())], root.resolve().parent
        else:
            entries = read_input_list(root)
            base = Path(os.path.commonpath([str(e.path.resolve().parent if e.path.is_file() else e.path.resolve())
                                            for e in entries]))
    else:
        entries, base = [_ListEntry(root.resolve())], root.resolve()
    items: list[BatchItem] = []
    for entry in entries:
        if entry.source_kernel:
            get_kernel(entry.source_kernel)
        items += _index_entry(entry, base, out_root, target, source_kernel, model)
    unique = {it.key: it for it in items}  # the same input listed twice is indexed once
    items = sorted(unique.values(), key=lambda it: it.key)
    _assign_outputs(items, base, out_root)
    return items


def _index_entry(entry: _ListEntry, base: Path, out_root: Path, target: Any, default_source: str | None,
                 model: str | os.PathLike | None) -> list[BatchItem]:
    """The series of one input (a folder, walked; or an image file). A list row's ``source_kernel`` is given
    for its series whatever their headers say (the guard refuses a contradicted header without --force);
    ``default_source`` (``--source-kernel``) only stands in where a header names no kernel, one not in the
    library, or one without a known response (as the domain guard takes a given kernel)."""
    path = entry.path.resolve() if entry.path.exists() else entry.path
    source_kernel = entry.source_kernel
    rel = os.path.relpath(path, base)
    if not entry.path.exists():
        return [BatchItem(key=rel, input=str(entry.path), kind="image", decision="fail",
                          reason=f"{entry.path} does not exist")]
    if path.is_file():
        if _image_ext(path) is None:
            return [BatchItem(key=rel, input=str(path), kind="image", decision="fail",
                              reason=f"{path} is neither a folder of DICOM series nor an image file "
                                     f"({', '.join(IMAGE_EXTENSIONS)})")]
        return [_image_item(path, rel, target, source_kernel or default_source, model)]
    items: list[BatchItem] = []
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    for folder, files in _walk(path, out_root):
        for f in files:
            if _image_ext(f) is not None:
                items.append(_image_item(f, os.path.relpath(f, base), target, source_kernel or default_source, model))
        if not any(looks_like_dicom(f) for f in files if _image_ext(f) is None):
            continue
        try:
            series = _scan_dicom_folder(folder)
        except LTDiffPPError as exc:
            items.append(BatchItem(key=os.path.relpath(folder, base), input=str(folder), kind="dicom",
                                   decision="fail", reason=str(exc)))
            continue
        for uid, files_ds in series.items():
            by_uid.setdefault(uid, []).extend(files_ds)
    for uid, files_ds in by_uid.items():
        if entry.series_uid is not None and uid != entry.series_uid:
            continue
        items.append(_dicom_item(uid, files_ds, base, target, source_kernel, default_source, model))
    return items


def _scan_dicom_folder(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """The DICOM image headers directly in ``folder`` by SeriesInstanceUID (the reader's own scan: the
    same files it would read); a folder whose DICOM files are all non-images (reports, DICOMDIR) gives {}."""
    from .io.dicom_read import scan_dicom_folder

    try:
        return scan_dicom_folder(folder)
    except InputError as exc:
        if str(exc).startswith("No DICOM image files found"):
            return {}
        raise


def _text(value: Any) -> str:
    from .io.dicom_read import tag_text

    return tag_text(value).strip()


def _dicom_item(uid: str, files_ds: list[tuple[Path, Any]], base: Path, target: Any, source_kernel: str | None,
                default_source: str | None, model: str | os.PathLike | None) -> BatchItem:
    folders = sorted({p.parent for p, _ in files_ds})
    folder = folders[0] if len(folders) == 1 else Path(os.path.commonpath([str(f) for f in folders]))
    rel = os.path.relpath(folder, base)
    path0, ds = files_ds[0]
    item = BatchItem(key=f"{rel}#{uid}", input=str(folder), kind="dicom", decision="convert", series_uid=uid,
                     files=[str(p) for p, _ in files_ds] if len(folders) > 1 else [], slices=len(files_ds),
                     description=_text(ds.get("SeriesDescription")))
    try:
        modality = _text(ds.get("Modality"))
        image_type = [v.upper() for v in _text(ds.get("ImageType")).split("\\")]
        frames = int(float(_text(ds.get("NumberOfFrames")) or 1))
    except Exception as exc:  # noqa: BLE001 - a header value pydicom cannot decode
        return replace(item, decision="fail", reason=f"{path0}: the header cannot be decoded ({exc})")
    if modality and modality != "CT":
        return replace(item, decision="skip", reason=f"modality {modality}, not CT")
    if "LOCALIZER" in image_type:
        return replace(item, decision="skip", reason="a localizer (scout) image, not a tomographic series")
    if frames > 1:
        return replace(item, decision="fail", reason=f"{path0} is a multi-frame (enhanced) DICOM file; only series "
                                                      "with one slice per file are read")
    header_kernel = ds.get("ConvolutionKernel")
    if not source_kernel and default_source:
        from .kernels import kernel_from_dicom

        ev = kernel_from_dicom(ds.get("Manufacturer"), header_kernel)
        if ev.kernel is None or not ev.kernel.has_response:  # as the guard: it stands in for what is unknown
            source_kernel = default_source
    item.given_source_kernel = source_kernel
    return _decide_kernel(item, ds.get("Manufacturer"), header_kernel, target, source_kernel, model)


def _image_item(path: Path, rel: str, target: Any, source_kernel: str | None,
                model: str | os.PathLike | None) -> BatchItem:
    item = BatchItem(key=rel, input=str(path), kind="image", decision="convert", given_source_kernel=source_kernel)
    try:
        slices, meta = _image_slices(path)
    except InputError as exc:
        return replace(item, decision="fail", reason=str(exc))
    item.slices = slices
    written = meta.get("LTDiffPP_target_kernel")  # an output of LTDiffPP says what it was converted to
    return _decide_kernel(item, None, None, target, source_kernel, model, written_kernel=written)


def _decide_kernel(item: BatchItem, manufacturer: Any, convolution_kernel: Any, target: Any,
                   source_kernel: str | None, model: str | os.PathLike | None,
                   written_kernel: str | None = None) -> BatchItem:
    """Convert / skip / fail by the source kernel the header (or the user) names, as the domain guard will."""
    from .guard import model_for_pair, shipped_pairs_text
    from .kernels import find_kernel, get_kernel, kernel_from_dicom, same_response

    if source_kernel:
        kernel, how = get_kernel(source_kernel), "given"
    elif written_kernel:
        kernel, how = find_kernel(written_kernel), f"LTDiffPP output header: {written_kernel}"
        if kernel is None:
            return replace(item, source_kernel_how=how)
    elif convolution_kernel is not None or manufacturer is not None:
        ev = kernel_from_dicom(manufacturer, convolution_kernel)
        if ev.kernel is None and not ev.found:
            return replace(item, source_kernel_how="to be estimated from the image (the header names no kernel)")
        if ev.kernel is None:
            return replace(item, decision="fail", source_kernel_how="DICOM header",
                           reason=f"source kernel unknown — {ev.note}; list it with a source_kernel column "
                                  "(CSV/JSON input) or --source-kernel if you know its library equivalent")
        kernel, how = ev.kernel, f"DICOM header: {ev.found}"
    else:
        return replace(item, source_kernel_how="to be estimated from the image (an image file names no kernel)")
    item = replace(item, source_kernel=kernel.name, source_kernel_how=how)
    if kernel.has_response and same_response(kernel, target):
        return replace(item, decision="skip", reason=f"already {target.name} ({how})")
    if not kernel.has_response:
        return replace(item, decision="fail", reason=f"source kernel {kernel.name} ({how}) has no known frequency "
                                                     "response, so no model can convert it; if you know a library "
                                                     "kernel with the same response, pass it as --source-kernel (or "
                                                     "a source_kernel column of a CSV/JSON input list)")
    if model is None and model_for_pair(kernel, target) is None:
        return replace(item, decision="fail", reason=f"no shipped model converts {kernel.name} -> {target.name} "
                                                     f"(the shipped models convert {shipped_pairs_text()})")
    return item


def _leaf(item: BatchItem) -> str:
    """A folder name for one of several series of a folder: its UID's digest (stable, short, safe)."""
    return "series-" + hashlib.sha1(item.series_uid.encode()).hexdigest()[:10]


def output_path_for(item: BatchItem, base: Path, out_root: Path, own_folder: bool) -> Path:
    """Where ``item``'s output goes: OUTPUT/<the input's path relative to the cohort root>.

    An image file keeps its name (and so its format); a DICOM series gets the folder of the same relative
    path when it is the only series there and no other input lies below it (``own_folder``), else a
    ``series-<digest of its UID>`` folder inside that one.
    """
    rel = Path(os.path.relpath(item.input, base))
    if item.kind == "image":
        return out_root / rel
    if own_folder and str(rel) != ".":
        return out_root / rel
    return out_root / rel / _leaf(item)


def _assign_outputs(items: list[BatchItem], base: Path, out_root: Path) -> None:
    dicom_folders: dict[str, int] = {}
    for it in items:
        if it.kind == "dicom":
            dicom_folders[it.input] = dicom_folders.get(it.input, 0) + 1
    inputs = [Path(it.input) for it in items]
    for it in items:
        if it.kind != "dicom" or it.decision == "fail":  # an empty SeriesInstanceUID (anonymized) is one series too
            continue
        here = Path(it.input)
        nested = any(p != here and here in p.parents for p in inputs)
        it.output = str(output_path_for(it, base, out_root, dicom_folders[it.input] == 1 and not nested))
    for it in items:
        if it.kind == "image":
            it.output = str(output_path_for(it, base, out_root, True))


# ------------------------------------------------------------------------------------------------ manifest
def _manifest_parts(out_root: Path) -> list[Path]:
    return sorted(out_root.glob("manifest.part*.jsonl"))


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a manifest file, in order; a last line cut short by a killed run is ignored (every
    other line must be a JSON object, else :class:`InputError` naming the file and line)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1 or all(not rest.strip() for rest in lines[i + 1:]) or _cut_short(line):
                continue  # a run was killed while writing this line (a later run went on after it)
            raise InputError(f"{path}: line {i + 1} is not JSON ({exc}); the manifest is damaged") from exc
        if isinstance(record, dict) and "key" in record:
            out.append(record)
    return out


def _cut_short(line: str) -> bool:
    """True for the start of a record cut off by a killed writer: JSON that ends early, not other text."""
    try:
        json.loads(line)
    except json.JSONDecodeError as exc:
        ends_early = exc.msg.startswith("Unterminated string") or exc.pos >= len(line.rstrip()) - 1
        return line.lstrip().startswith('{"key"') and ends_early
    return False


def load_records(out_root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The latest record per series key from ``OUTPUT/manifest.jsonl`` and any per-shard parts a killed
    or running batch left (parts are newer than the merged file)."""
    out_root = Path(out_root)
    latest: dict[str, dict[str, Any]] = {}
    for path in [out_root / MANIFEST, *_manifest_parts(out_root)]:
        for rec in read_manifest(path):
            latest[rec["key"]] = rec
    return latest


class ManifestWriter:
    """Appends records to one manifest file, one JSON line each, flushed and fsynced per line (a killed
    run leaves every finished series recorded). Thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if self._f.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
            if cut:  # a run killed mid-line: end that line so that it stays apart (the reader skips it)
                self._f.write("\n")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=False, default=_json_default)
        with self._lock:
            self._f.write(line + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        with self._lock:
            self._f.close()


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite(value: Any) -> Any:
    """``value`` with NaN/Inf floats (anywhere inside) as None: a manifest line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def merge_manifest(out_root: str | os.PathLike, keys_order: Sequence[str] | None = None) -> Path:
    """Rewrite ``OUTPUT/manifest.jsonl`` atomically with the latest record per series (the merged file and
    all per-shard parts), then remove the parts. ``keys_order``: the index order to list them in (keys not
    in it follow, sorted)."""
    from .io import atomic_output

    out_root = Path(out_root)
    parts = _manifest_parts(out_root)
    latest = load_records(out_root)
    order = {k: i for i, k in enumerate(keys_order or ())}
    records = sorted(latest.values(), key=lambda r: (order.get(r["key"], len(order)), r["key"]))
    final = out_root / MANIFEST
    with atomic_output(final, overwrite=True) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(_finite(rec), ensure_ascii=False, allow_nan=False, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
    for p in parts:
        p.unlink(missing_ok=True)
    return final


# ------------------------------------------------------------------------------------------------ options
@dataclass
class BatchOptions:
    """What a batch converts to and how (the CLI's flags). ``device``: ``auto``/``cpu``/``cuda``/``mps``;
    ``precision``: ``auto`` (:func:`choose_precision`), ``float32`` or ``bfloat16``; ``prefetch``: series
    read ahead of the one converting (memory: one volume each); ``workers``: local worker processes (None:
    one per GPU where there are several, else 1)."""

    target_kernel: str
    source_kernel: str | None = None
    model: str | None = None
    device: str = "auto"
    workers: int | None = None
    overwrite: bool = False
    force: bool = False
    steps: int | None = None
    solver: str | None = None
    seed: int = 0
    batch_size: int | None = None
    precision: str = "auto"
    prefetch: int = 1
    report: bool = True
    quiet: bool = False


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bfloat16 instructions (x86 AVX512_BF16 or AMX-BF16; Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(precision: str, device_type: str, model_sha256: str) -> tuple[str, str]:
    """(precision to run, why). ``"auto"``: bfloat16 on CUDA (as ``standardize``), and on a CPU with native
    bf16 instructions for a model whose bf16 concordance was measured within 0.002 of float32
    (:data:`BF16_MEASURED`); float32 otherwise (CPUs without them emulate bf16, slower)."""
    if precision != "auto":
        return precision, "asked for"
    if device_type == "cuda":
        return "bfloat16", "auto: bfloat16 on CUDA"
    if device_type == "cpu" and model_sha256 in BF16_MEASURED:
        if cpu_has_native_bf16():
            return "bfloat16", f"auto: native bf16 CPU and {BF16_MEASURED[model_sha256]}"
        return "float32", "auto: this CPU has no native bf16 instructions"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "float32", "auto: bf16 concordance not measured for this model"
    return "float32", "auto"


# ------------------------------------------------------------------------------------------------ worker
@dataclass
class _Loaded:
    item: BatchItem
    volume: Any = None
    plan: Any = None
    record: dict[str, Any] | None = None  # set when the series ends before conversion (skip/fail)
    warnings: list[str] = field(default_factory=list)
    t_start: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)


_capture = threading.local()


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    """Route a warning to the list of the series its thread is working on (else print it as one line)."""
    sink = getattr(_capture, "warnings", None)
    text = " ".join(str(message).split())
    if sink is not None:
        if text not in sink:
            sink.append(text)
    else:
        print(f"ltdiffpp: warning: {text}", file=sys.stderr)


class _Captured:
    """Warnings raised in this thread inside the block go to ``target`` (a list)."""

    def __init__(self, target: list[str]) -> None:
        self.target = target

    def __enter__(self) -> list[str]:
        self.previous = getattr(_capture, "warnings", None)
        _capture.warnings = self.target
        return self.target

    def __exit__(self, *exc: Any) -> None:
        _capture.warnings = self.previous


def _base_record(item: BatchItem, opts: BatchOptions, run: str, shard: int) -> dict[str, Any]:
    return {"key": item.key, "input": item.input, "status": "", "reason": item.reason, "series_uid": item.series_uid,
            "source_kernel": item.source_kernel, "source_kernel_how": item.source_kernel_how,
            "target_kernel": opts.target_kernel, "model": None, "model_sha256": None, "precision": None,
            "warnings": [], "seconds": 0.0, "slices": item.slices, "output": item.output, "timing": {}, "qc": None,
            "run": run, "host": socket.gethostname(), "shard": shard, "finished": ""}


def _finish(record: dict[str, Any]) -> dict[str, Any]:
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return _finite(record)


def _read_series(item: BatchItem) -> Any:
    """The series' volume (a split series is read through a staging folder of links to its files)."""
    import tempfile

    from .io import read_volume

    if item.kind == "image":
        return read_volume(item.input)
    if not item.files:
        return read_volume(item.input, series_uid=item.series_uid)
    with tempfile.TemporaryDirectory(prefix="ltdiffpp-series-") as stage:
        for i, f in enumerate(item.files):
            os.symlink(f, Path(stage) / f"{i:06d}.dcm")
        volume = read_volume(stage, series_uid=item.series_uid)
    volume.source = item.input
    return volume


def run_worker(items: Sequence[BatchItem], opts: BatchOptions, sink: Callable[[dict[str, Any]], None], *,
               run: str = "", shard: int = 0, device: str | None = None,
               on_series: Callable[[dict[str, Any]], None] | None = None,
               on_slices: Callable[[BatchItem, float, int], None] | None = None,
               cancel: threading.Event | None = None, qc_dir: Path | None = None) -> None:
    """Convert ``items`` (all decided ``convert``) one after another, recording each through ``sink``.

    Three threads overlap: a reader reads and plans up to ``opts.prefetch`` series ahead, this thread
    converts, and a writer writes the previous output, measures its quality control and records it.
    Models are loaded once each (cached by name). ``qc_dir``: where the quality control thumbnails go
    (None: none are drawn). Every series ends in exactly one record:
    ``done``, ``skipped`` (the domain guard found nothing to convert) or ``failed`` (with the reason).
    """
    from .guard import DomainError, NothingToConvert, plan_conversion
    from .inference import pick_device, standardize_volume
    from .modelfile import load_model

    dev = pick_device(device or opts.device)
    cancel = cancel or threading.Event()
    loaded_q: queue.Queue = queue.Queue(maxsize=max(1, opts.prefetch))
    done_q: queue.Queue = queue.Queue(maxsize=1)
    errors: list[BaseException] = []
    model_ref = opts.model

    def reader() -> None:
        try:
            for item in items:
                if cancel.is_set():
                    break
                entry = _Loaded(item=item, t_start=time.perf_counter())
                with _Captured(entry.warnings):
                    t0 = time.perf_counter()
                    try:
                        entry.volume = _read_series(item)
                        entry.timing["read"] = time.perf_counter() - t0
                        t1 = time.perf_counter()
                        source = item.given_source_kernel
                        entry.plan = plan_conversion(entry.volume, opts.target_kernel, source, model_ref, opts.force)
                        entry.timing["plan"] = time.perf_counter() - t1
                    except NothingToConvert as exc:
                        entry.record = {"status": "skipped", "reason": str(exc)}
                    except LTDiffPPError as exc:
                        what = "refused by the domain guard" if isinstance(exc, DomainError) else "unreadable"
                        entry.record = {"status": "failed", "reason": f"{what}: {exc}"}
                    except MemoryError as exc:
                        entry.record = {"status": "failed", "reason": f"out of memory reading it ({exc})"}
                    except Exception as exc:  # noqa: BLE001 - one odd series must not stop a cohort
                        entry.record = {"status": "failed", "reason": _unexpected("reading", exc)}
                loaded_q.put(entry)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
            errors.append(exc)
        finally:
            loaded_q.put(None)

    def writer() -> None:
        from . import qc as qcmod

        try:
            while True:
                job = done_q.get()
                if job is None:
                    break
                entry, converted, meta = job
                record = _base_record(entry.item, opts, run, shard)
                record.update(meta)
                if entry.record is None:
                    with _Captured(entry.warnings):
                        t0 = time.perf_counter()
                        try:
                            _write_output(entry, converted, meta, opts)
                            entry.timing["write"] = time.perf_counter() - t0
                            t1 = time.perf_counter()
                            try:
                                thumb = None if qc_dir is None else qc_dir / qcmod.thumbnail_name(entry.item.key)
                                record["qc"] = qcmod.series_qc(entry.volume, converted, entry.plan.source.kernel,
                                                               entry.plan.target, thumb)
                            except Exception as exc:  # noqa: BLE001 - QC must never lose a finished output
                                record["qc"] = {"error": f"{type(exc).__name__}: {exc}"}
                            entry.timing["qc"] = time.perf_counter() - t1
                            record.update(status="done", reason="converted")
                        except LTDiffPPError as exc:
                            record.update(status="failed", reason=f"cannot write the output: {exc}")
                        except Exception as exc:  # noqa: BLE001 - one odd series must not stop a cohort
                            record.update(status="failed", reason=_unexpected("writing", exc))
                else:
                    record.update(entry.record)
                    if record["status"] != "done":
                        record["output"] = None
                plan = entry.plan
                if plan is not None:
                    record["source_kernel"] = plan.source.kernel.name
                    record["source_kernel_how"] = plan.source.describe()
                    record["target_kernel"] = plan.target.name
                    if plan.notes:
                        record["adapted"] = plan.notes
                    if plan.overridden:
                        record["overridden"] = plan.overridden
                if entry.volume is not None:
                    record["slices"] = int(entry.volume.hu.shape[0])
                record["warnings"] = list(entry.warnings)
                record["timing"] = {k: round(v, 3) for k, v in entry.timing.items()}
                record["seconds"] = round(time.perf_counter() - entry.t_start, 3)
                record = _finish(record)
                sink(record)
                if on_series is not None:
                    on_series(record)
                entry.volume = None
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
            errors.append(exc)
            cancel.set()
            while True:  # unblock the converter
                try:
                    if done_q.get_nowait() is None:
                        break
                except queue.Empty:
                    break

    models: dict[str, Any] = {}
    model_errors: dict[str, LTDiffPPError] = {}
    precisions: dict[str, tuple[str, str]] = {}
    threads = [threading.Thread(target=reader, name="ltdiffpp-reader", daemon=True),
               threading.Thread(target=writer, name="ltdiffpp-writer", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            entry = loaded_q.get()
            if entry is None:
                break
            meta: dict[str, Any] = {}
            converted = None
            if entry.record is None and not cancel.is_set():
                with _Captured(entry.warnings):
                    try:
                        name = str(entry.plan.model)
                        if name in model_errors:  # a model that failed to load fails its series at once
                            raise model_errors[name]
                        if name not in models:
                            try:
                                models[name] = load_model(entry.plan.model)
                            except LTDiffPPError as exc:
                                model_errors[name] = exc
                                raise
                            precisions[name] = choose_precision(opts.precision, dev.type, models[name].sha256)
                        model = models[name]
                        precision, why = precisions[name]
                        meta = {"model": str(model.metadata.get("name", model.path.stem)),
                                "model_sha256": model.sha256, "precision": precision, "precision_reason": why}
                        n = int(entry.volume.hu.shape[0])

                        def progress(done: float, total: int, item: BatchItem = entry.item) -> None:
                            if on_slices is not None:
                                on_slices(item, done * n / max(total, 1), n)

                        t0 = time.perf_counter()
                        converted, entry.plan = standardize_volume(
                            entry.volume, model=model, plan=entry.plan, device=dev, steps=opts.steps,
                            solver=opts.solver, seed=opts.seed, batch_size=opts.batch_size, precision=precision,
                            progress=progress, cancel=cancel)
                        entry.timing["convert"] = time.perf_counter() - t0
                        meta["steps"] = int(model.metadata["sampling"]["steps"] if opts.steps is None else opts.steps)
                        meta["solver"] = str(opts.solver or model.metadata["sampling"]["solver"])
                        meta["sampling"] = f"{meta['solver']} {meta['steps']} steps, seed {opts.seed}"
                    except LTDiffPPError as exc:
                        if cancel.is_set():
                            raise
                        entry.record = {"status": "failed", "reason": f"conversion failed: {exc}"}
                    except Exception as exc:  # noqa: BLE001 - e.g. CUDA out of memory: this series only
                        entry.record = {"status": "failed", "reason": _unexpected("converting", exc)}
            elif cancel.is_set():
                break
            done_q.put((entry, converted, meta))
            if errors:
                break
    except BaseException:
        cancel.set()  # an interrupt: the reader stops; the writer writes and records the outputs it holds
        if not errors and threads[1].is_alive():
            with contextlib.suppress(queue.Full):
                done_q.put(None, timeout=600)
            threads[1].join(timeout=600)
        else:
            with contextlib.suppress(queue.Full):
                done_q.put_nowait(None)
        threads[0].join(timeout=5)
        raise
    if errors:
        cancel.set()
        with contextlib.suppress(queue.Full):
            done_q.put_nowait(None)
        for t in threads:
            t.join(timeout=5)
        raise errors[0]
    done_q.put(None)  # the writer records what it holds, then stops
    for t in threads:
        t.join()


def _unexpected(doing: str, exc: BaseException) -> str:
    """The reason recorded for an exception no check anticipated (type, first 300 characters)."""
    return f"unexpected error while {doing} it: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _write_output(entry: _Loaded, converted: Any, meta: dict[str, Any], opts: BatchOptions) -> None:
    """Write one converted series where the index put it (atomically; the input is never touched)."""
    from .io import series_description
    from .io import software_versions, write_volume

    plan = entry.plan
    out = Path(entry.item.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    description = series_description(f"LTDiffPP {plan.source.kernel.name}->{plan.target.name}", meta["model"],
                                       meta["solver"], meta["steps"], opts.seed)
    provenance = {"software": ", ".join(f"{k} {v}" for k, v in software_versions().items()),
                  "model": meta["model"], "model_sha256": meta["model_sha256"],
                  "sampling": f"{meta['sampling']}, precision {meta['precision']}", "batch_key": entry.item.key,
                  **plan.provenance()}
    write_volume(converted, out, overwrite=opts.overwrite, series_description=description,
                 convolution_kernel=plan.target.name, provenance=provenance)


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class BatchPlan:
    """The index and what this run does with it: ``work`` (to convert), ``records`` (decided without
    converting: skipped, failed, or already done by an earlier run, with ``carried`` keys of the latter)."""

    items: list[BatchItem]
    work: list[BatchItem]
    records: list[dict[str, Any]]
    carried: list[str]


def plan_batch(items: list[BatchItem], out_root: Path, opts: BatchOptions, run: str) -> BatchPlan:
    """Resume: decide per indexed series whether this run converts it.

    A series whose latest record is ``done`` and whose output exists is kept as is (unless ``overwrite``);
    ``done`` with its output gone is converted again; an output that exists without a ``done`` record (a
    run killed between writing it and recording it, or a file that was there before) is never rewritten
    without ``overwrite``: it is recorded ``skipped`` saying so. Failed and skipped series are decided again.
    """
    previous = load_records(out_root)
    work, records, carried = [], [], []
    for it in items:
        if it.decision != "convert":
            rec = _base_record(it, opts, run, 0)
            rec.update(status="skipped" if it.decision == "skip" else "failed", output=None)
            records.append(_finish(rec))
            continue
        prev = previous.get(it.key)
        exists = os.path.lexists(it.output)
        if prev is not None and prev.get("status") == "done" and exists and not opts.overwrite:
            carried.append(it.key)
            continue
        if exists and not opts.overwrite:
            rec = _base_record(it, opts, run, 0)
            rec.update(status="skipped", output=it.output,
                       reason=f"{it.output} exists but no manifest record says it is done (a run killed after "
                              "writing it, or an earlier file); not rewritten without --overwrite")
            records.append(_finish(rec))
            continue
        work.append(it)
    return BatchPlan(items=items, work=work, records=records, carried=carried)


def shard_items(items: Sequence[BatchItem], shards: int) -> list[list[BatchItem]]:
    """Split ``items`` into ``shards`` lists of about equal slice counts (largest first onto the least
    loaded shard; deterministic, each item in exactly one shard, index order kept inside a shard)."""
    shards = max(1, int(shards))
    load = [0] * shards
    owner: dict[int, int] = {}
    for i in sorted(range(len(items)), key=lambda i: (-max(items[i].slices, 1), i)):
        s = min(range(shards), key=lambda k: (load[k], k))
        owner[i] = s
        load[s] += max(items[i].slices, 1)
    return [[items[i] for i in range(len(items)) if owner[i] == s] for s in range(shards)]


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class BatchResult:
    """What a run did: counts by status over the whole index (``carried`` = done by earlier runs), this
    run's converted slices and seconds, and the paths of the manifest and the report."""

    counts: dict[str, int]
    carried: int
    converted: int
    slices: int
    wall_s: float
    io_s: float
    worker_s: float
    manifest: Path | None
    report: Path | None
    items: list[BatchItem]

    def summary(self) -> str:
        c = self.counts
        rate = self.slices / self.wall_s if self.wall_s > 0 else 0.0
        per_hour = self.converted / self.wall_s * 3600 if self.wall_s > 0 else 0.0
        io = 100 * self.io_s / self.worker_s if self.worker_s > 0 else 0.0
        return (f"{len(self.items)} series: {c.get('done', 0)} done ({self.converted} converted now, {self.carried} "
                f"by earlier runs), {c.get('skipped', 0)} skipped, {c.get('failed', 0)} failed; {self.slices} slices "
                f"in {self.wall_s:.1f} s = {rate:.2f} slices/s, {per_hour:.0f} series/hour; I/O {io:.0f} % of "
                "worker time")


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _run_id() -> str:
    return f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{socket.gethostname()}-{os.getpid()}"


def _check_paths(input_path: Path, out_root: Path) -> None:
    check_not_input(out_root, [input_path])  # OUTPUT is not INPUT, not inside it, does not hold it
    if input_path.is_file() and input_path.suffix.lower() in (".csv", ".json"):
        for e in read_input_list(input_path):
            check_not_input(out_root, [e.path])
    if out_root.exists() and not out_root.is_dir():
        raise OutputError(f"{out_root} exists and is not a folder; a batch writes a folder of outputs")


def run_batch(input_path: str | os.PathLike, output: str | os.PathLike, opts: BatchOptions, *,
              dry_run: bool = False, log: Callable[[str], None] | None = None) -> BatchResult:
    """Standardize every series below ``input_path`` into ``output`` (see the module docstring).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this; rank 0 indexes and merges. ``dry_run``:
    index and decide, print the decisions, write nothing. Raises :class:`LTDiffPPError` for problems with
    INPUT or OUTPUT (before any work), and :class:`OutputError` when another batch writes OUTPUT now.
    """
    log = log or (lambda text: print(text, file=sys.stderr))
    input_path, out_root = Path(input_path), Path(output)
    rank, world, local_rank = _dist_env()
    if world > 1:
        if opts.workers is not None and opts.workers > 1:
            raise InputError("--workers applies to a single process; under torchrun start one rank per GPU or "
                             "core group with --nproc_per_node instead")
        return _run_distributed(input_path, out_root, opts, rank, world, local_rank, dry_run, log)
    _check_paths(input_path, out_root)
    if opts.workers is None:
        gpus = _cuda_count() if opts.device in ("auto", "cuda") else 0
        opts = replace(opts, workers=gpus if gpus > 1 else 1)
    t0 = time.perf_counter()
    items = index_inputs(input_path, out_root, opts.target_kernel, source_kernel=opts.source_kernel, model=opts.model)
    if dry_run:
        return _dry_run(items, out_root, opts, log, time.perf_counter() - t0)
    out_root.mkdir(parents=True, exist_ok=True)
    with output_lock(out_root):
        run = _run_id()
        plan = plan_batch(items, out_root, opts, run)
        _log_plan(plan, log, opts, time.perf_counter() - t0)
        workers = max(1, min(opts.workers, len(plan.work)))  # no process without work
        shards = shard_items(plan.work, workers) if workers > 1 else [plan.work]
        writer = ManifestWriter(out_root / MANIFEST)
        try:
            for rec in plan.records:
                writer.write(rec)
        finally:
            writer.close()
        t_work = time.perf_counter()
        if workers > 1:
            _run_local_workers(shards, out_root, opts, run, log)
        else:
            _run_shard(shards[0], out_root, opts, run, 0, None, show=not opts.quiet, part=False)
        return _conclude(plan, out_root, opts, run, time.perf_counter() - t_work, log)


def _dry_run(items: list[BatchItem], out_root: Path, opts: BatchOptions, log: Callable[[str], None],
             seconds: float) -> BatchResult:
    previous = load_records(out_root) if out_root.is_dir() else {}
    counts: dict[str, int] = {}
    for it in items:
        what = it.decision
        if what == "convert" and previous.get(it.key, {}).get("status") == "done" and os.path.lexists(it.output) \
                and not opts.overwrite:
            what = "done"
        counts[what] = counts.get(what, 0) + 1
        src = it.source_kernel or "?"
        print(f"{what:8s} {it.input}{' [' + it.series_uid + ']' if it.series_uid else ''} ({it.slices} slices, "
              f"{src} -> {opts.target_kernel}){': ' + it.reason if it.reason else ''}"
              f"{' -> ' + it.output if what == 'convert' else ''}")
    log(f"dry run: indexed {len(items)} series in {seconds:.1f} s: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "; nothing was written")
    done = {"done": counts.get("done", 0), "skipped": counts.get("skip", 0), "failed": counts.get("fail", 0)}
    return BatchResult(done, counts.get("done", 0), 0, 0, 0.0, 0.0, 0.0, None, None, items)


def _log_plan(plan: BatchPlan, log: Callable[[str], None], opts: BatchOptions, seconds: float) -> None:
    if opts.quiet:
        return
    skipped = sum(1 for r in plan.records if r["status"] == "skipped")
    failed = sum(1 for r in plan.records if r["status"] == "failed")
    slices = sum(it.slices for it in plan.work)
    log(f"indexed {len(plan.items)} series in {seconds:.1f} s: {len(plan.work)} to convert ({slices} slices), "
        f"{len(plan.carried)} done by earlier runs, {skipped} skipped, {failed} failed")


def _run_shard(items: list[BatchItem], out_root: Path, opts: BatchOptions, run: str, shard: int,
               device: str | None, *, show: bool, part: bool) -> None:
    """One worker: convert ``items``, appending records to the manifest (or its shard's part file)."""
    from tqdm import tqdm

    show = show and bool(items)
    path = out_root / (f"manifest.part{shard}.jsonl" if part else MANIFEST)
    writer = ManifestWriter(path)
    total = sum(it.slices for it in items)
    series_bar = tqdm(total=len(items), unit="series", desc="series", disable=not show, position=0)
    slice_bar = tqdm(total=total, unit="slice", desc="slices", disable=not show, position=1)
    done_slices = [0.0]
    current: dict[str, float] = {}

    def on_slices(item: BatchItem, done: float, n: int) -> None:
        current[item.key] = done
        slice_bar.update(done_slices[0] + done - slice_bar.n)

    def on_series(record: dict[str, Any]) -> None:
        item_slices = next((it.slices for it in items if it.key == record["key"]), 0)
        done_slices[0] += item_slices
        current.pop(record["key"], None)
        slice_bar.update(done_slices[0] - slice_bar.n)
        series_bar.update(1)
        if record["status"] != "done":
            series_bar.write(f"ltdiffpp: {record['status']}: {record['input']}: {record['reason']}", file=sys.stderr)

    previous_show = warnings.showwarning
    warnings.showwarning = _showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            run_worker(items, opts, writer.write, run=run, shard=shard, device=device, on_series=on_series,
                       on_slices=on_slices, qc_dir=out_root / "qc" if opts.report else None)
    finally:
        warnings.showwarning = previous_show
        writer.close()
        slice_bar.close()
        series_bar.close()


def _worker_entry(items: list[BatchItem], out_root: str, opts: BatchOptions, run: str, shard: int,
                  device: str | None, threads: int) -> None:
    """A local worker process (``--workers``): its own model, threads and manifest part."""
    import torch

    torch.set_num_threads(max(1, threads))
    _run_shard(items, Path(out_root), opts, run, shard, device, show=False, part=True)


def _run_local_workers(shards: list[list[BatchItem]], out_root: Path, opts: BatchOptions, run: str,
                       log: Callable[[str], None]) -> None:
    import multiprocessing as mp

    from tqdm import tqdm

    gpus = _cuda_count() if opts.device in ("auto", "cuda") else 0
    threads = max(1, (os.cpu_count() or 1) // len(shards)) if not gpus else 1
    ctx = mp.get_context("spawn")
    procs = []
    for s, items in enumerate(shards):
        device = f"cuda:{s % gpus}" if gpus else opts.device
        p = ctx.Process(target=_worker_entry, args=(items, str(out_root), opts, run, s, device, threads),
                        name=f"ltdiffpp-worker-{s}")
        p.start()
        procs.append(p)
    total = sum(len(s) for s in shards)
    with tqdm(total=total, unit="series", desc=f"series ({len(shards)} workers)", disable=opts.quiet) as bar:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            n = sum(1 for part in _manifest_parts(out_root) for r in read_manifest(part) if r.get("run") == run)
            bar.update(n - bar.n)
    bad = [p for p in procs if p.exitcode != 0]
    if bad:
        raise OutputError(f"{len(bad)} of {len(procs)} batch workers exited abnormally (exit codes "
                          f"{[p.exitcode for p in bad]}); rerun the same command to complete the rest")


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def _conclude(plan: BatchPlan, out_root: Path, opts: BatchOptions, run: str, wall: float,
              log: Callable[[str], None]) -> BatchResult:
    manifest = merge_manifest(out_root, [it.key for it in plan.items])
    records = {r["key"]: r for r in read_manifest(manifest)}
    indexed = [records[it.key] for it in plan.items if it.key in records]
    counts = {s: sum(1 for r in indexed if r["status"] == s) for s in STATUSES}
    now = [r for r in indexed if r.get("run") == run and r["status"] == "done"]
    this_run = [r for r in indexed if r.get("run") == run]
    io = sum((r.get("timing") or {}).get("read", 0) + (r.get("timing") or {}).get("write", 0) for r in this_run)
    busy = sum(sum((r.get("timing") or {}).values()) for r in this_run)
    report = None
    if opts.report:
        from .qc import write_report

        report = write_report(out_root, indexed, title=f"LTDiffPP batch to {opts.target_kernel}")
    result = BatchResult(counts=counts, carried=len(plan.carried), converted=len(now),
                         slices=sum(int(r.get("slices") or 0) for r in now), wall_s=wall, io_s=io, worker_s=busy,
                         manifest=manifest, report=report, items=plan.items)
    if not opts.quiet:
        log(result.summary())
        log(f"manifest {manifest}" + (f"; quality control {report}" if report else ""))
    return result


def _run_distributed(input_path: Path, out_root: Path, opts: BatchOptions, rank: int, world: int, local_rank: int,
                     dry_run: bool, log: Callable[[str], None]) -> BatchResult:
    """torchrun: rank 0 checks, locks, indexes and resumes; the work is broadcast and sharded; each rank
    converts its shard (on GPU ``LOCAL_RANK`` where there are GPUs); rank 0 merges and reports."""
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:  # gloo for the control messages also on GPU machines; long timeout: ranks wait at the end
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        with contextlib.ExitStack() as stack:
            payload: list[Any] = [None]
            if rank == 0:
                try:
                    _check_paths(input_path, out_root)
                    t0 = time.perf_counter()
                    items = index_inputs(input_path, out_root, opts.target_kernel, source_kernel=opts.source_kernel,
                                         model=opts.model)
                    if dry_run:
                        payload[0] = ("dry", _dry_run(items, out_root, opts, log, time.perf_counter() - t0))
                    else:
                        out_root.mkdir(parents=True, exist_ok=True)
                        stack.enter_context(output_lock(out_root))
                        run = _run_id()
                        plan = plan_batch(items, out_root, opts, run)
                        _log_plan(plan, log, opts, time.perf_counter() - t0)
                        writer = ManifestWriter(out_root / MANIFEST)
                        for rec in plan.records:
                            writer.write(rec)
                        writer.close()
                        payload[0] = ("work", run, shard_items(plan.work, world), plan)
                except LTDiffPPError as exc:
                    payload[0] = ("error", exc)
            dist.broadcast_object_list(payload, src=0)
            what = payload[0]
            if what[0] == "error":
                raise what[1]
            if what[0] == "dry":
                return what[1]
            _, run, shards, plan = what
            gpus = _cuda_count() if opts.device in ("auto", "cuda") else 0
            device = f"cuda:{local_rank % gpus}" if gpus else opts.device
            t_work = time.perf_counter()
            _run_shard(shards[rank], out_root, opts, run, rank, device, show=rank == 0 and not opts.quiet, part=True)
            dist.barrier()
            result = None
            if rank == 0:
                result = _conclude(plan, out_root, opts, run, time.perf_counter() - t_work, log)
            box = [result]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["BF16_MEASURED", "MANIFEST", "MANIFEST_FIELDS", "REPORT", "BatchItem", "BatchOptions", "BatchPlan",
           "BatchResult", "ManifestWriter", "choose_precision", "cpu_has_native_bf16", "index_inputs",
           "load_records", "merge_manifest", "output_path_for", "plan_batch", "read_input_list", "read_manifest",
           "run_batch", "run_worker", "shard_items"]
