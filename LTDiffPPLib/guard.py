"""The domain guard: check what a conversion is given before any work, and decide how to run it.

:func:`plan_conversion` looks at a :class:`~LTDiffPPLib.io.CTVolume` and the kernel asked for and returns a
:class:`ConversionPlan` — which kernel the input has and how that was found, which model converts it, and
what has to be adapted (reformat to axial, resample in-plane to the model's pixel size) — or refuses with
a :class:`DomainError` that names everything that is wrong and how to override it. Cases:

- **source kernel**: from the DICOM header (Manufacturer + ConvolutionKernel, :mod:`LTDiffPPLib.kernels`),
  else the ``source_kernel`` given, else estimated from the image (its skin-edge MTF against the library's
  responses, with a confidence); refused when unidentifiable, not in the library, equal to the target (nothing
  to convert) or not the kernel the model converts from;
- **orientation**: a volume whose slices are not axial is reformatted to axial and back when its axes are
  the patient axes (sagittal or coronal stacks); oblique volumes are refused;
- **in-plane pixel size** outside what the model was trained on: resampled in-plane to the nearest trained
  size and back (kernel texture is a function of mm⁻¹, not of pixels);
- **size**: slices smaller than :data:`MIN_SLICE_PX` in y or x are refused;
- **values**: images with no voxel below 0 HU (an 8-bit display image, raw unsigned stored values) are
  refused as not HU;
- **doubtful responses**: a source or target kernel whose library response real measurements contradict
  (``Kernel.doubtful``: GE SOFT/STANDARD/CHEST) is refused.

Refusals other than an unknown target kernel and a missing model can be overridden with ``force=True``
(``--force``): the plan records what was overridden (:attr:`ConversionPlan.overridden`) and it goes into
the output's provenance. Adaptations and overrides are reported as :class:`DomainWarning`, a warning
category that API users can filter (``warnings.simplefilter("error", DomainWarning)``).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .io import CTVolume
from .kernels import (ImageKernelEstimate, Kernel, KernelEvidence, find_kernel, get_kernel, identify_kernel_from_image,
                      kernel_from_dicom, ordered_pairs, same_response)
from .modelcard import read_metadata, registry, resolve_model

#: Smallest slice (pixels along y and along x) converted. Measured on crops of the real test1 slice
#: (B30f -> B70f with the shipped model, 12 crops per size, docs/KERNELS.md "Small images"): at 16 px the
#: converted crop is further from the real B70f than the unconverted one (mean absolute difference 82 vs
#: 70 HU); from 24 px it is closer (67 vs 85), from 32 px its texture SD is within 15 % of the reference's.
MIN_SLICE_PX = 32
#: Largest angle (degrees) between the slice normal and the patient's head-foot axis for "axial"
#: (a gantry tilt of up to 30° keeps the slices axial enough for a 2-D in-plane model).
AXIAL_TOLERANCE_DEG = 30.0
#: Slack around the model's trained in-plane pixel range before resampling (texture barely changes).
PIXEL_SLACK = (0.8, 1.25)


class DomainWarning(UserWarning):
    """The input was adapted (reformatted, resampled) or an out-of-domain check was overridden."""


class DomainError(InputError):
    """The input is outside what the model knows; the message lists every problem and how to override."""


class NothingToConvert(DomainError):
    """The input already has the target kernel."""


@dataclass
class ConversionPlan:
    """How one volume is converted; see :func:`plan_conversion`.

    ``source``: the input's kernel and how it was found; ``target``: the kernel asked for; ``model``:
    registered name or path of the model that converts source → target; ``axes``: numpy axis order that
    makes the slices axial (None: already axial); ``pixel_mm``: (dy, dx) in-plane pixel size to resample the
    (axial) slices to (None: as is); ``notes``: adaptations made; ``overridden``: checks overridden by force.
    """

    source: KernelEvidence
    target: Kernel
    model: str
    axes: tuple[int, int, int] | None = None
    pixel_mm: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)

    def provenance(self) -> dict[str, str]:
        """Text for the output's provenance (DICOM DerivationDescription / image metadata)."""
        out = {"source_kernel": self.source.describe(), "target_kernel": self.target.name}
        if self.notes:
            out["adapted"] = "; ".join(self.notes)
        if self.overridden:
            out["overridden"] = "; ".join(self.overridden)
        return out


#: source and target kernel of a kernel-conditioned model's metadata and registry entry
ANY_KERNEL = "any"


def conditioned_kernels(meta: dict[str, Any]) -> list[str] | None:
    """The kernels a kernel-conditioned model converts between (from its metadata), or None for a model of
    one fixed pair."""
    if not meta.get("config", {}).get("kernel_conditioned"):
        return None
    return list(meta.get("kernels") or [])


def registered_pairs() -> list[tuple[str, str, str]]:
    """(model name, source kernel, target kernel) of every registered model, in registry order; a
    kernel-conditioned model contributes every ordered pair of its kernels."""
    entries, _ = registry()
    out = []
    for e in entries:
        if e.source_kernel == ANY_KERNEL:
            out += [(e.name, s, t) for s, t in ordered_pairs(list(e.kernels))]
        else:
            out.append((e.name, e.source_kernel, e.target_kernel))
    return out


def shipped_pairs_text() -> str:
    """The registered conversions in a few words, for messages."""
    entries, _ = registry()
    parts = [f"any two of {', '.join(e.kernels)} ({e.name})" if e.source_kernel == ANY_KERNEL
             else f"{e.source_kernel}->{e.target_kernel}" for e in entries]
    return ", ".join(parts)


def model_for_pair(source: Kernel, target: Kernel) -> str | None:
    """The registered model converting ``source`` → ``target`` (or a kernel declared equivalent), or None."""
    for name, s, t in registered_pairs():
        ks, kt = find_kernel(s), find_kernel(t)
        if ks is not None and kt is not None and same_response(ks, source) and same_response(kt, target):
            return name
    return None


def source_evidence(volume: CTVolume, source_kernel: str | None = None) -> KernelEvidence:
    """The input's kernel: the one given (checked against the header, which is reported when it differs),
    else the DICOM header's, else unidentified."""
    header = volume.dicom_header
    from_header = (kernel_from_dicom(header.get("Manufacturer"), header.get("ConvolutionKernel"))
                   if header is not None else KernelEvidence(None, "none", "", "an image file carries no kernel"))
    if source_kernel:
        given = get_kernel(source_kernel)
        note = ""
        if from_header.kernel is not None and from_header.kernel.has_response:
            if not same_response(from_header.kernel, given):
                return KernelEvidence(given, "given", source_kernel, f"the header says {from_header.kernel.name}",
                                      contradicted=True)
        elif from_header.found:  # a header kernel without a known response: the given one stands in for it
            note = f"given for header kernel {from_header.found!r}"
        return KernelEvidence(given, "given", source_kernel, note)
    if from_header.kernel is None and not from_header.found:  # no kernel in a header: estimate it
        est = image_estimate(volume)
        if est.kernel is not None:
            alt = f"; indistinguishable from {', '.join(est.alternatives)}" if est.alternatives else ""
            return KernelEvidence(est.kernel, "estimated from the image", "",
                                  f"skin-edge MTF, confidence {est.confidence:.2f}{alt}")
        return KernelEvidence(None, from_header.how, "", f"{from_header.note}, and {est.note}")
    return from_header


def image_estimate(volume: CTVolume) -> ImageKernelEstimate:
    """The kernel the volume's skin edge looks like (:func:`LTDiffPPLib.kernels.identify_kernel_from_image`);
    unidentified for non-axial stacks (their in-plane edge mixes the slice profile in)."""
    if axial_axes(volume.direction) is not None:
        return ImageKernelEstimate(None, 0.0, note="the slices are not axial, so the kernel was not estimated")
    return identify_kernel_from_image(volume.hu, (volume.spacing[1], volume.spacing[0]))


def axial_axes(direction: tuple[float, ...]) -> tuple[int, int, int] | None | str:
    """How to make a volume's slices axial: None (already axial), the numpy axis order of a (z, y, x)
    array that puts the axis nearest the head-foot direction first (sagittal/coronal stacks), or
    ``"oblique"`` when no axis is within :data:`AXIAL_TOLERANCE_DEG` of it."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)  # column j: patient direction of SimpleITK axis j
    cos_tol = math.cos(math.radians(AXIAL_TOLERANCE_DEG))
    along_s = np.abs(d[2, :])  # |component along S| of each axis (LPS: third row)
    if along_s[2] >= cos_tol:
        return None
    j = int(np.argmax(along_s))
    if along_s[j] < cos_tol:
        return "oblique"
    first = 2 - j  # numpy axis of SimpleITK axis j
    rest = [a for a in (0, 1, 2) if a != first]
    return (first, *rest)


def _model_meta(model: str | os.PathLike) -> dict[str, Any]:
    path, _ = resolve_model(model)
    return read_metadata(path)


def plan_conversion(volume: CTVolume, target_kernel: str | None = None, source_kernel: str | None = None,
                    model: str | os.PathLike | None = None, force: bool = False, warn: bool = True) -> ConversionPlan:
    """Check ``volume`` against the conversion asked for; return the plan or raise :class:`DomainError`.

    Args:
        volume: the input, HU (z, y, x) with geometry (and DICOM header when read from DICOM).
        target_kernel: library name of the kernel wanted (default: the model's target kernel).
        source_kernel: library name of the input's kernel, when the header lacks it or is wrong.
        model: registered name or path; default: the registered model for the (source, target) pair.
        force: convert despite overridable problems (recorded in :attr:`ConversionPlan.overridden`).
        warn: issue a :class:`DomainWarning` for each adaptation and override.
    """
    name = volume.source or "the input"
    problems: list[str] = []   # overridable with force
    overridden: list[str] = []

    def problem(text: str) -> None:
        (overridden if force else problems).append(text)

    meta = _model_meta(model) if model is not None else None
    trained = conditioned_kernels(meta) if meta is not None else None  # a kernel-conditioned model's kernels
    if target_kernel:
        target = get_kernel(target_kernel)
    elif trained is not None:
        raise DomainError(f"model {model} converts between any two of {', '.join(trained)}: give the target kernel "
                          "(--target-kernel NAME)")
    elif meta is not None:
        target = get_kernel(meta["target_kernel"])
    else:
        _, default = registry()
        target = get_kernel(_model_meta(default)["target_kernel"])
    if trained is not None:
        if not any(same_response(get_kernel(k), target) for k in trained):
            raise DomainError(f"model {model} converts between {', '.join(trained)}, not to {target.name}; "
                              f"leave out --model to pick the model for the kernel pair")
    elif meta is not None and not same_response(get_kernel(meta["target_kernel"]), target):
        raise DomainError(f"model {model} converts to {meta['target_kernel']}, not to {target.name}; "
                          f"leave out --model to pick the model for the kernel pair")

    source = source_evidence(volume, source_kernel)
    if source.kernel is None:
        fallback = get_kernel(meta["source_kernel"]) if meta is not None and trained is None else None
        if fallback is None:
            # the source of the one per-pair model converting to the target (the kernel-conditioned model
            # converts from any of its kernels: no single one to assume)
            fixed = [e for e in registry()[0] if e.source_kernel != ANY_KERNEL
                     and same_response(get_kernel(e.target_kernel), target)]
            fallback = get_kernel(fixed[0].source_kernel) if len(fixed) == 1 else None
        hint = ("pass --source-kernel NAME (`ltdiffpp kernels` lists the library)"
                + (f", or --force to treat it as {fallback.name}" if fallback is not None else ""))
        text = f"{name}: source kernel unknown — {source.note or 'no kernel found'}; {hint}"
        if force and fallback is not None:
            overridden.append(f"source kernel unknown ({source.note}), treated as {fallback.name}")
            source = KernelEvidence(fallback, "assumed (--force)", source.found, source.note)
        else:
            raise DomainError(text)
    elif source.contradicted:  # a given kernel the header contradicts
        problem(f"{name}: --source-kernel {source.kernel.name} was given, but {source.note}")
    if not source.kernel.has_response:
        est = image_estimate(volume)
        hint = (f"; its skin edge {est.describe()}: pass --source-kernel {est.kernel.name} to convert it as that"
                if est.kernel is not None else "; if you know a library kernel with the same response, pass it "
                "as --source-kernel")
        raise DomainError(f"{name}: source kernel {source.describe()} has no known frequency response, so no model "
                          f"can convert it{hint}")
    if same_response(source.kernel, target):
        raise NothingToConvert(f"{name} is already {target.name} ({source.describe()}); nothing to convert")
    for role, kernel in (("source", source.kernel), ("target", target)):
        if kernel.doubtful:  # a response that measurements on real data contradict: converting would mislead
            problem(f"the {role} kernel {kernel.name}'s library response is doubtful ({kernel.caveat.removeprefix('doubtful: ')})")

    if meta is not None:
        model_name = str(model)
        if trained is not None:
            if not any(same_response(get_kernel(k), source.kernel) for k in trained):
                problem(f"model {model} converts between {', '.join(trained)}, but the input is {source.describe()}")
        elif not same_response(get_kernel(meta["source_kernel"]), source.kernel):
            problem(f"model {model} converts from {meta['source_kernel']}, but the input is {source.describe()}")
    else:
        found = model_for_pair(source.kernel, target)
        if found is None:
            raise DomainError(f"{name}: no shipped model converts {source.kernel.name} -> {target.name} "
                              f"(source: {source.describe()}); the shipped models convert {shipped_pairs_text()}")
        model_name = found
        meta = _model_meta(found)

    notes: list[str] = []
    axes = axial_axes(volume.direction)
    spacing_zyx = (volume.spacing[2], volume.spacing[1], volume.spacing[0])
    shape = volume.hu.shape
    if axes == "oblique":
        problem(f"{name}: slices are oblique (no image axis within {AXIAL_TOLERANCE_DEG:g} degrees of the "
                "head-foot axis); the model converts axial slices")
        axes = None
    elif axes is not None:
        normal = np.abs(np.asarray(volume.direction).reshape(3, 3)[:, 2])  # patient direction of the slice normal
        view = "sagittal" if normal[0] >= normal[1] else "coronal"
        notes.append(f"{view} stack reformatted to axial slices for the conversion and back")
        spacing_zyx = tuple(spacing_zyx[a] for a in axes)
        shape = tuple(shape[a] for a in axes)
    dy, dx = spacing_zyx[1], spacing_zyx[2]
    lo, hi = meta.get("pixel_spacing_mm") or (dy, dx)
    pixel = None
    if (any(s < lo * PIXEL_SLACK[0] or s > hi * PIXEL_SLACK[1] for s in (dy, dx))
            or not PIXEL_SLACK[0] <= dy / dx <= PIXEL_SLACK[1]):
        want = float(min(max(math.sqrt(dy * dx), lo), hi))
        pixel = (want, want)
        notes.append(f"in-plane pixels {dy:.3g} x {dx:.3g} mm resampled to {want:.3g} mm (the model's trained "
                     f"{lo:g}-{hi:g} mm) for the conversion and back")
        shape = (shape[0], round(shape[1] * dy / want), round(shape[2] * dx / want))
    if min(shape[1], shape[2]) < MIN_SLICE_PX:
        problem(f"{name}: slices of {shape[1]} x {shape[2]} px are too small (at least {MIN_SLICE_PX} x "
                f"{MIN_SLICE_PX} px are needed)")
    lo_hu, hi_hu = float(volume.hu.min()), float(volume.hu.max())
    if lo_hu >= 0:
        kind = "an 8-bit display image (screenshot)" if hi_hu <= 255 else "raw unsigned stored values"
        problem(f"{name}: no voxel is below 0 HU (range {lo_hu:.0f} to {hi_hu:.0f}): these are not Hounsfield "
                f"units (air is -1000 HU); it looks like {kind}")
    if problems:
        raise DomainError("; ".join(problems) + " — pass --force to convert anyway")
    plan = ConversionPlan(source=source, target=target, model=model_name,
                          axes=axes if isinstance(axes, tuple) else None, pixel_mm=pixel, notes=notes,
                          overridden=overridden)
    if warn:
        for text in notes:
            warnings.warn(f"{name}: {text}", DomainWarning, stacklevel=2)
        for text in overridden:
            warnings.warn(f"{name}: converted despite: {text} (--force)", DomainWarning, stacklevel=2)
    return plan

