"""Quality control of a standardized cohort: per-series noise and NPS against the target kernel's
expectation, soft-tissue HU bias, thumbnails, and one HTML report that puts the outliers first.

What the target kernel "should give" comes from the kernel library, not from a reference scan (a cohort
has none): in FBP the noise of an image is the filtered projection noise, so converting kernel S to kernel T
multiplies the noise power spectrum by G(f)² with G = W_T / W_S (:func:`LTDiffPPLib.kernels.pair_gain`,
the library's frequency responses, f in mm⁻¹). :func:`series_qc` filters the *input* slices by G
(:func:`linear_conversion`) and compares the noise SD and NPS of homogeneous soft-tissue patches of that
expected image with the same patches of the output. A converted series whose noise is far from that (or whose soft tissue moved in
mean HU: G(0) = 1, a kernel conversion keeps mean values) is flagged.

Numbers are in HU (noise SD, bias), mm⁻¹ (frequency) and HU²·mm² (NPS).
"""

from __future__ import annotations

import hashlib
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .concordance import noise_sd, radial_nps

#: a converted series is flagged when its noise SD is outside [1/x, x] times the expected one
NOISE_RATIO_LIMIT = 1.5
#: ... or when its soft tissue moved by more than this many HU on average
HU_BIAS_LIMIT_HU = 10.0
#: ... or when a cohort of at least COHORT_MIN converted series finds it this many robust SDs (MAD) away
ROBUST_Z_LIMIT = 3.5
COHORT_MIN = 5
#: soft tissue for patches and the bias: HU of the smoothed input within this range
SOFT_TISSUE_HU = (-100.0, 100.0)
#: thumbnails: soft-tissue window (centre, width) in HU, and at most this many pixels a side per panel
WINDOW_HU = (40.0, 400.0)
THUMB_PX = 192


def thumbnail_name(key: str) -> str:
    """The thumbnail file name of a series key (stable, safe for any path)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16] + ".png"


def _slice_indices(nz: int, count: int = 5) -> list[int]:
    """Up to ``count`` slices evenly spread over the middle 80 % of a stack."""
    if nz <= count:
        return list(range(nz))
    lo, hi = int(0.1 * nz), max(int(0.1 * nz) + 1, int(math.ceil(0.9 * nz)) - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, count)})


def homogeneous_patches(hu: np.ndarray, size: int | None = None, per_slice: int = 4,
                        slices: Sequence[int] | None = None) -> list[tuple[int, int, int, int]]:
    """Square soft-tissue patches of a (z, y, x) HU volume with the least structure: (z, y0, x0, size).

    Tiles of ``size`` px (32, or 16 below 128-px slices) whose every pixel lies within ±300 HU and whose
    mean lies in :data:`SOFT_TISSUE_HU`; of those, per slice the quarter with the lowest detrended SD (at
    most ``per_slice``). Empty when the image has no such region (a lung-only crop, a phantom of air).
    """
    nz, ny, nx = hu.shape
    size = size or (32 if min(ny, nx) >= 128 else 16)
    if min(ny, nx) < size:
        return []
    out = []
    for z in (slices if slices is not None else _slice_indices(nz)):
        cands = []
        for y0 in range(0, ny - size + 1, size):
            for x0 in range(0, nx - size + 1, size):
                p = hu[z, y0:y0 + size, x0:x0 + size]
                mean = float(p.mean())
                if SOFT_TISSUE_HU[0] <= mean <= SOFT_TISSUE_HU[1] and float(np.abs(p).max()) <= 300.0:
                    cands.append((z, y0, x0))
        if not cands:
            continue
        sds = noise_sd([hu[z, y:y + size, x:x + size] for z, y, x in cands])
        keep = max(1, min(per_slice, len(cands) // 4))
        out += [(*cands[i], size) for i in np.argsort(sds, kind="stable")[:keep]]
    return out


def linear_conversion(image: np.ndarray, source: Any, target: Any, spacing_yx: tuple[float, float]) -> np.ndarray:
    """A (y, x) slice filtered by the kernel ratio G(|f|) = W_target / W_source (f in mm⁻¹): what the
    target kernel gives the same projections, to first order (the mean kept: G(0) = 1). The slice is
    padded with its edge values to twice its size so that the filter does not wrap around."""
    from .kernels import pair_gain

    ny, nx = image.shape
    padded = np.pad(image.astype(np.float64), ((0, ny), (0, nx)), mode="edge")
    fy = np.fft.fftfreq(2 * ny, d=spacing_yx[0])
    fx = np.fft.fftfreq(2 * nx, d=spacing_yx[1])
    g = pair_gain(source, target, np.hypot(fy[:, None], fx[None, :]))
    return np.real(np.fft.ifft2(np.fft.fft2(padded) * g))[:ny, :nx]


def series_qc(before: Any, after: Any, source: Any, target: Any, thumbnail: Path | None = None) -> dict[str, Any]:
    """Quality control numbers of one converted series (``before``/``after``: CTVolumes on one grid;
    ``source``/``target``: library :class:`~LTDiffPPLib.kernels.Kernel`s). Draws ``thumbnail`` (PNG:
    input | output | difference, middle slice) when given. Returns a JSON-ready dict:

    ``noise_sd_before_hu``, ``noise_sd_after_hu``, ``noise_sd_expected_hu`` (medians over the patches),
    ``noise_ratio`` (after / expected), ``nps_log_error`` (mean |ln(NPS_after / NPS_expected)|),
    ``hu_bias_soft_tissue_hu`` (mean output − input in smoothed soft tissue), ``patches``, ``nps``
    (``f_per_mm``, ``before``, ``after``, ``expected``), ``flags`` (why it is an outlier; empty if not),
    ``notes``, ``thumbnail`` (file name).
    """
    b, a = np.asarray(before.hu, dtype=np.float32), np.asarray(after.hu, dtype=np.float32)
    spacing_yx = (float(before.spacing[1]), float(before.spacing[0]))
    out: dict[str, Any] = {"noise_sd_before_hu": None, "noise_sd_after_hu": None, "noise_sd_expected_hu": None,
                           "noise_ratio": None, "nps_log_error": None, "hu_bias_soft_tissue_hu": None,
                           "patches": 0, "nps": None, "flags": [], "notes": [], "thumbnail": None}
    patches = homogeneous_patches(b)
    if patches:
        pb = [b[z, y:y + s, x:x + s] for z, y, x, s in patches]
        pa = [a[z, y:y + s, x:x + s] for z, y, x, s in patches]
        expected = {z: linear_conversion(b[z], source, target, spacing_yx) for z in sorted({z for z, *_ in patches})}
        pe = [expected[z][y:y + s, x:x + s] for z, y, x, s in patches]
        sd_b, sd_a, sd_e = (float(np.median(noise_sd(ps))) for ps in (pb, pa, pe))
        f, nps_b = radial_nps(pb, spacing_yx)
        _, nps_a = radial_nps(pa, spacing_yx)
        _, nps_e = radial_nps(pe, spacing_yx)
        ok = (nps_a > 0) & (nps_e > 0)
        out.update(noise_sd_before_hu=sd_b, noise_sd_after_hu=sd_a, noise_sd_expected_hu=sd_e,
                   noise_ratio=sd_a / sd_e if sd_e > 0 else None, patches=len(patches),
                   nps_log_error=float(np.mean(np.abs(np.log(nps_a[ok] / nps_e[ok])))) if ok.any() else None,
                   nps={"f_per_mm": _round(f, 4), "before": _round(nps_b, 5), "after": _round(nps_a, 5),
                        "expected": _round(nps_e, 5)})
        ratio = out["noise_ratio"]
        if ratio is not None and not 1 / NOISE_RATIO_LIMIT <= ratio <= NOISE_RATIO_LIMIT:
            out["flags"].append(f"noise SD {sd_a:.1f} HU is {ratio:.2f}× the {sd_e:.1f} HU expected for {target.name}")
    else:
        out["notes"].append("no homogeneous soft-tissue region found: noise and NPS not measured")
    zs = _slice_indices(b.shape[0])
    smooth = ndimage.uniform_filter(b[zs], size=(1, 5, 5))
    mask = ndimage.binary_erosion((smooth >= SOFT_TISSUE_HU[0]) & (smooth <= SOFT_TISSUE_HU[1]),
                                  structure=np.ones((1, 5, 5), dtype=bool))
    if mask.sum() >= 100:
        bias = float(np.mean(a[zs][mask] - b[zs][mask]))
        out["hu_bias_soft_tissue_hu"] = bias
        if abs(bias) > HU_BIAS_LIMIT_HU:
            out["flags"].append(f"soft tissue moved {bias:+.1f} HU on average (a kernel conversion keeps mean HU)")
    else:
        out["notes"].append("too little soft tissue for the HU bias")
    if thumbnail is not None:
        draw_thumbnail(b[b.shape[0] // 2], a[a.shape[0] // 2], thumbnail)
        out["thumbnail"] = thumbnail.name
    return out


def _round(values: np.ndarray, digits: int) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in np.asarray(values, dtype=np.float64)]


def _window(hu: np.ndarray) -> np.ndarray:
    c, w = WINDOW_HU
    return (np.clip((hu - (c - w / 2)) / w, 0.0, 1.0) * 255).astype(np.uint8)


def _shrink(img: np.ndarray) -> np.ndarray:
    """Block-mean downsampling to at most THUMB_PX a side (integer factor)."""
    k = max(1, int(math.ceil(max(img.shape) / THUMB_PX)))
    if k == 1:
        return img
    ny, nx = (img.shape[0] // k) * k, (img.shape[1] // k) * k
    return img[:ny, :nx].reshape(ny // k, k, nx // k, k).mean(axis=(1, 3))


def draw_thumbnail(before: np.ndarray, after: np.ndarray, path: Path) -> Path:
    """PNG of one slice: input | output (soft-tissue window W400/L40) | output − input (±100 HU), written
    atomically; each panel at most :data:`THUMB_PX` px a side."""
    from matplotlib.image import imsave

    diff = (np.clip((after - before) / 200.0 + 0.5, 0.0, 1.0) * 255).astype(np.uint8)
    panels = [_shrink(p.astype(np.float32)) for p in (_window(before), _window(after), diff)]
    gap = np.full((panels[0].shape[0], 4), 255.0)
    image = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # not atomic_output: it lists the folder per call
    try:
        imsave(tmp, image, cmap="gray", vmin=0, vmax=255, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ report
def cohort_outliers(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Flags by series key: each record's own (:func:`series_qc`) plus, for cohorts of at least
    :data:`COHORT_MIN` converted series, a robust z-score (median / 1.4826 MAD) above
    :data:`ROBUST_Z_LIMIT` of ln(noise ratio) or of the soft-tissue HU bias."""
    flags: dict[str, list[str]] = {}
    done = [r for r in records if r.get("status") == "done" and isinstance(r.get("qc"), dict)]
    for r in done:
        if r["qc"].get("flags"):
            flags.setdefault(r["key"], []).extend(r["qc"]["flags"])
        if r["qc"].get("error"):
            flags.setdefault(r["key"], []).append(f"quality control failed: {r['qc']['error']}")
    for name, label, fn in (("noise_ratio", "noise / expected", lambda v: math.log(v) if v and v > 0 else None),
                            ("hu_bias_soft_tissue_hu", "soft-tissue HU bias", lambda v: v)):
        values = {r["key"]: fn(r["qc"].get(name)) for r in done if r["qc"].get(name) is not None}
        values = {k: v for k, v in values.items() if v is not None}
        if len(values) < COHORT_MIN:
            continue
        arr = np.array(list(values.values()))
        med = float(np.median(arr))
        mad = 1.4826 * float(np.median(np.abs(arr - med)))
        if mad <= 1e-9:
            continue
        for k, v in values.items():
            z = (v - med) / mad
            if abs(z) > ROBUST_Z_LIMIT:
                flags.setdefault(k, []).append(f"{label} {z:+.1f} robust SDs from the cohort's median")
    return flags


def _num(v: Any, fmt: str = "{:.1f}") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def nps_svg(nps: dict[str, list[float]] | None, width: int = 200, height: int = 110) -> str:
    """An inline SVG of the radial NPS (log scale): input grey, output blue, expected orange dashed."""
    if not nps or not nps.get("f_per_mm"):
        return ""
    f = np.asarray(nps["f_per_mm"], dtype=float)
    curves = {k: np.asarray(nps[k], dtype=float) for k in ("before", "after", "expected")}
    positive = np.concatenate([c[c > 0] for c in curves.values()])
    if positive.size == 0:
        return ""
    lo, hi = math.log10(positive.min()), math.log10(positive.max())
    hi = hi if hi > lo else lo + 1
    pad = 4

    def xy(fi: float, v: float) -> str:
        x = pad + (width - 2 * pad) * fi / max(f.max(), 1e-9)
        y = height - pad - (height - 2 * pad) * (math.log10(v) - lo) / (hi - lo)
        return f"{x:.1f},{y:.1f}"

    styles = {"before": 'stroke="#888"', "after": 'stroke="#1f5fbf"', "expected": 'stroke="#e07b00" stroke-dasharray="4 3"'}
    lines = []
    for k, c in curves.items():
        pts = " ".join(xy(fi, v) for fi, v in zip(f, c) if v > 0)
        lines.append(f'<polyline fill="none" stroke-width="1.6" {styles[k]} points="{pts}"><title>{k}</title></polyline>')
    return (f'<svg class="nps" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="NPS"><rect width="{width}" height="{height}" '
            f'fill="#fafafa" stroke="#ccc"/>{"".join(lines)}<text x="{width - pad}" y="{height - pad - 2}" '
            f'font-size="9" text-anchor="end">{f.max():.2f} mm⁻¹</text></svg>')


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;font-size:13px}th{background:#f3f3f3}
tr.flag{background:#fff1f0}.flags{color:#b00020}.muted{color:#777}img{image-rendering:pixelated}
.key{font-family:monospace;font-size:12px;word-break:break-all;max-width:28em}"""


def write_report(out_root: str | os.PathLike, records: Sequence[dict[str, Any]], title: str = "LTDiffPP batch") -> Path:
    """Write ``OUTPUT/report.html`` (atomically) and ``OUTPUT/qc/qc.csv`` from manifest records: counts,
    flagged series first (with why), every converted series with its thumbnail, noise SD before / after /
    expected, NPS plot and HU bias, then the failed and skipped ones with their reasons."""
    import csv

    from .io import atomic_output

    out_root = Path(out_root)
    flags = cohort_outliers(records)
    done = [r for r in records if r.get("status") == "done"]
    failed = [r for r in records if r.get("status") == "failed"]
    skipped = [r for r in records if r.get("status") == "skipped"]
    done.sort(key=lambda r: (r["key"] not in flags, r["key"]))
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>",
             f"<p><b>{len(records)}</b> series: <b>{len(done)}</b> done, <b>{len(skipped)}</b> skipped, "
             f"<b>{len(failed)}</b> failed; <b class=flags>{len(flags)}</b> flagged for review.</p>",
             "<p class=muted>Noise SD: median detrended SD of homogeneous soft-tissue patches of the input, at the same "
             "places in the output. <i>Expected</i>: the input's noise filtered by the library's kernel ratio "
             "W<sub>target</sub>/W<sub>source</sub> (what the target kernel gives the same projections). NPS plot: input "
             "grey, output blue, expected orange dashed (log scale, 0 to Nyquist). Thumbnails: input | output "
             f"(W{WINDOW_HU[1]:g}/L{WINDOW_HU[0]:g}) | output − input (±100 HU). Flagged: noise outside "
             f"{1 / NOISE_RATIO_LIMIT:.2f}–{NOISE_RATIO_LIMIT:.2f}× expected, soft-tissue bias over {HU_BIAS_LIMIT_HU:g} HU, "
             f"or over {ROBUST_Z_LIMIT:g} robust SDs from the cohort.</p>"]
    if done:
        parts.append("<h2>Converted</h2><table><tr><th>series</th><th>kernels</th><th>thumbnail</th><th>noise SD (HU)"
                     "<br>in / out / expected</th><th>out / expected</th><th>NPS</th><th>soft-tissue bias (HU)</th>"
                     "<th>flags</th></tr>")
        for r in done:
            q = r.get("qc") or {}
            thumb = q.get("thumbnail")
            img = (f'<img src="qc/{e(thumb)}" loading="lazy" alt="thumbnail" width="{3 * THUMB_PX // 2}">'
                   if thumb else "")
            f = flags.get(r["key"], [])
            parts.append(
                f"<tr{' class=flag' if f else ''}><td class=key>{e(r['key'])}<br><span class=muted>"
                f"{e(str(r.get('output') or ''))}</span></td><td>{e(str(r.get('source_kernel')))} → "
                f"{e(str(r.get('target_kernel')))}<br><span class=muted>{e(str(r.get('source_kernel_how') or ''))}"
                f"</span></td><td>{img}</td><td>{_num(q.get('noise_sd_before_hu'))} / {_num(q.get('noise_sd_after_hu'))}"
                f" / {_num(q.get('noise_sd_expected_hu'))}</td><td>{_num(q.get('noise_ratio'), '{:.2f}')}</td>"
                f"<td>{nps_svg(q.get('nps'))}</td><td>{_num(q.get('hu_bias_soft_tissue_hu'), '{:+.1f}')}</td>"
                f"<td class=flags>{'<br>'.join(e(x) for x in f)}{''.join('<br><span class=muted>' + e(n) + '</span>' for n in q.get('notes', []))}</td></tr>")
        parts.append("</table>")
    for name, rows in (("Failed", failed), ("Skipped", skipped)):
        if rows:
            parts.append(f"<h2>{name}</h2><table><tr><th>series</th><th>reason</th></tr>")
            parts += [f"<tr><td class=key>{e(r['key'])}</td><td>{e(str(r.get('reason') or ''))}</td></tr>" for r in rows]
            parts.append("</table>")
    parts.append("</body></html>\n")
    path = out_root / "report.html"
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text("".join(parts), encoding="utf-8")
    qc_dir = out_root / "qc"
    qc_dir.mkdir(exist_ok=True)
    columns = ["key", "status", "source_kernel", "target_kernel", "noise_sd_before_hu", "noise_sd_after_hu",
               "noise_sd_expected_hu", "noise_ratio", "nps_log_error", "hu_bias_soft_tissue_hu", "flags", "output"]
    with atomic_output(qc_dir / "qc.csv", overwrite=True) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(columns)
            for r in records:
                q = r.get("qc") or {}
                w.writerow([r["key"], r.get("status"), r.get("source_kernel"), r.get("target_kernel"),
                            *(q.get(c) for c in columns[4:10]), "; ".join(flags.get(r["key"], [])), r.get("output")])
    return path
