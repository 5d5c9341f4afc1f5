"""Kernel standardization of a CT volume: encode → reverse diffusion in the latent → decode.

With a model that has a kernel prior (:class:`LTDiffPPLib.models.KernelPrior`) each slice is first
filtered by the fitted kernel ratio at the volume's own pixel size, and the diffusion model adds its
learned residual to that (see :mod:`LTDiffPPLib.models`). The comparison models run through the same
code: a pixel-space DDPM samples the unshuffled image instead of a latent, and a ``"unet++"`` direct
translator decodes the source latent without sampling (steps, solver, seed and ensemble do not apply).

One entry point, :func:`standardize`. Slices (axial, the (y, x) planes of a (z, y, x) volume) are
processed in batches, so memory is bounded by the batch size, not by the number of slices. Every slice
starts from the same seeded noise field (no slice-to-slice flicker of generated texture), so the result
depends only on the input, the model, the solver settings and the seed: bit-identical on the CPU for
the same settings; a different batch size changes results by < 0.01 HU (the CPU convolution library
chooses kernels by batch shape), far below the 1 HU step of stored CT values.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import limits
from .errors import Cancelled, InputError
from .modelfile import LoadedModel, load_model
from .sampler import SOLVERS, initial_noise

if TYPE_CHECKING:
    from .guard import ConversionPlan
    from .io import CTVolume

ProgressCallback = Callable[[float, int], None]
"""progress(done, total): ``done`` slices (fractional within a batch) out of ``total``."""


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else Apple MPS, else CPU; anything else is checked for availability."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but this PyTorch sees no CUDA GPU; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' was asked for, but Apple MPS is not available here; use --device cpu or auto")
    return dev


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass: 16 on a GPU; 2 on a CPU, where the 512² working set of a batch of 2
    stays closer to the caches (0.82 s/slice vs 0.98 at 4 and 1.26 at 8 for the default model on a
    2-core EPYC; BENCHMARKS.md; outputs differ by < 0.002 HU)."""
    return 16 if device.type == "cuda" else 2


def standardize(
    volume_hu: np.ndarray,
    spacing: tuple[float, ...] | None,
    model: LoadedModel | str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    steps: int | None = None,
    solver: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    ensemble: int = 1,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    out: np.ndarray | None = None,
    timings: dict[str, float] | None = None,
    precision: str = "auto",
) -> np.ndarray:
    """Convert a CT volume from the model's source kernel to its target kernel.

    Args:
        volume_hu: (z, y, x) or a single (y, x) slice, in HU. Not modified.
        spacing: voxel spacing in mm, (x, y[, z]) as SimpleITK orders it, or None (then the mean pixel
            size the model was trained on is assumed). A warning is given when the in-plane spacing lies
            outside what the model was trained on; a model's kernel prior filters at this pixel size.
        model: a :class:`LoadedModel`, a registered model name, a path, or None for the default model.
        device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"mps"``.
        steps, solver: sampling steps and ``"ddim"`` / ``"dpmpp2m"``; default: the model's metadata
            (ignored by a model without diffusion, ``config.variant == "unet++"``).
        seed: seeds the shared noise field (member k of an ensemble uses seed + k).
        batch_size: slices per forward pass (default: :func:`default_batch_size`).
        ensemble: average the decoded outputs of K samples (lowers noise *and* texture variance).
        progress: called as ``progress(done_slices, total_slices)`` after every sampling step.
        cancel: when set, the run stops at the next step and raises :class:`Cancelled`.
        out: optional preallocated float32 array (e.g. a ``np.memmap``) of the output shape.
        timings: when given, seconds spent in each phase are *added* to it under ``"copy"`` (HU
            normalization, padding, transfers to and from the device, writing into ``out``), ``"encode"``,
            ``"sample"`` and ``"decode"`` (on a GPU each phase then ends with a synchronization).
        precision: the networks' arithmetic: ``"float32"``, ``"bfloat16"`` (autocast; the sampler's ODE
            state and the kernel prior's FFT stay float32), or ``"auto"``: bfloat16 on CUDA, float32
            elsewhere (on a CPU bf16 is fast only with native bf16 instructions such as AVX512_BF16;
            docs/RESULTS.md measures its CCC against float32: within 0.002).

    Returns:
        float32 array of the input's shape, in HU, clipped to the model's HU range.
    """
    vol = _check_volume(volume_hu)
    squeeze = vol.ndim == 2
    if squeeze:
        vol = vol[None]
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    dev = pick_device(device)
    net = loaded.net.to(dev)
    meta = loaded.metadata
    cfg = loaded.config
    if cfg.kernel_conditioned and net.pair is None:
        raise InputError(f"{loaded.path.name} converts between many kernels: set the pair first "
                         "(model.net.set_pair(source, target)), or use standardize_volume with a target kernel")
    steps = int(meta["sampling"]["steps"] if steps is None else steps)
    solver = solver or meta["sampling"]["solver"]
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if (steps < 1 and cfg.has_diffusion) or ensemble < 1:
        raise InputError(f"steps and ensemble must be >= 1 (got steps={steps}, ensemble={ensemble})")
    if not cfg.has_diffusion:  # a direct translator: one deterministic pass, nothing to sample
        steps, ensemble = 0, 1
    batch_size = int(default_batch_size(dev) if batch_size is None else batch_size)
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    for name, value, bounds in (("seed", seed, limits.SEED), ("ensemble", ensemble, limits.ENSEMBLE),
                                ("batch size", batch_size, limits.BATCH_SIZE), ("steps", max(steps, 1), limits.STEPS)):
        limits.check_int(name, value, bounds)  # one-line errors instead of PyTorch's (a seed of 2**64)
    _warn_spacing(spacing, meta)
    pixel_mm = _pixel_mm(spacing, meta)

    n, h, w = vol.shape
    m = cfg.spatial_multiple
    ph, pw = (-h) % m, (-w) % m
    hu = meta["hu"]
    if out is None:
        out = np.empty(vol.shape, dtype=np.float32)
    elif out.shape != vol.shape:
        raise InputError(f"`out` has shape {out.shape}, expected {vol.shape}")
    latent_shape = (cfg.latent_channels, (h + ph) // cfg.patch, (w + pw) // cfg.patch)
    noises = [initial_noise(latent_shape, seed + k, dev) for k in range(ensemble)] if steps else []
    autocast = autocast_for(dev, precision)
    work_per_batch = ensemble * steps

    def phase(name: str) -> contextlib.AbstractContextManager[None]:
        return _timed(timings, name, dev) if timings is not None else contextlib.nullcontext()

    with torch.inference_mode(), autocast:
        for b0 in range(0, n, batch_size):
            b1 = min(n, b0 + batch_size)
            with phase("copy"):
                x = torch.from_numpy(np.ascontiguousarray(vol[b0:b1])).to(dev)[:, None]
                x = (x.clamp(hu["min"], hu["max"]) - hu["center"]) / hu["scale"]
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            with phase("encode"):
                cond = net.condition(x, pixel_mm)
            acc = None
            if not noises:  # direct translation: the output is the decoded source latent
                with phase("decode"):
                    acc = net.render(cond.latent, cond).float()
                if cancel is not None and cancel.is_set():
                    raise Cancelled("standardization cancelled")
                if progress is not None:
                    progress(b1, n)
            for k, noise in enumerate(noises):
                done_before = k * steps

                def on_step(i: int, _total: int, done_before: int = done_before) -> None:
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("standardization cancelled")
                    if progress is not None:
                        progress(b0 + (b1 - b0) * (done_before + i) / work_per_batch, n)

                with phase("sample"):
                    z = net.sample_latent(cond.latent, noise.expand(b1 - b0, *latent_shape), steps=steps, solver=solver,
                                          grid=meta["sampling"].get("grid", "logsnr"), callback=on_step)
                with phase("decode"):
                    y = net.render(z.to(cond.latent.dtype), cond).float()
                    acc = y if acc is None else acc + y
            with phase("copy"):
                y = (acc / ensemble)[:, 0, :h, :w] * hu["scale"] + hu["center"]
                out[b0:b1] = y.clamp(hu["min"], hu["max"]).cpu().numpy()
    return out[0] if squeeze else out


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str, dev: torch.device) -> Iterator[None]:
    """Add the wall time of the block to ``timings[name]`` (synchronizing a GPU before and after)."""
    _sync(dev)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync(dev)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def _check_volume(volume_hu: Any) -> np.ndarray:
    vol = np.asarray(volume_hu)
    if vol.ndim not in (2, 3):
        raise InputError(f"expected a (z, y, x) volume or a (y, x) slice, got an array of shape {vol.shape}")
    if vol.size == 0:
        raise InputError(f"the volume is empty (shape {vol.shape})")
    if not np.issubdtype(vol.dtype, np.number) or np.iscomplexobj(vol):
        raise InputError(f"expected real numeric voxels in HU, got dtype {vol.dtype}")
    vol = vol.astype(np.float32, copy=False)
    if not np.isfinite(vol).all():
        raise InputError(f"the volume has {int((~np.isfinite(vol)).sum())} NaN/Inf voxels")
    return vol


PRECISIONS = ("auto", "float32", "bfloat16")


def autocast_for(dev: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` (see :func:`standardize`) on ``dev``; ``"auto"`` is bf16 on
    CUDA and none elsewhere, which the trainer uses too."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16" or (precision == "auto" and dev.type == "cuda"):
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _pixel_mm(spacing: tuple[float, ...] | None, meta: dict[str, Any]) -> tuple[float, float]:
    """(dy, dx) in mm from a SimpleITK-ordered spacing, or the middle of the model's trained range."""
    if spacing is not None:
        dx, dy = (float(s) for s in spacing[:2])
        if dx > 0 and dy > 0:
            return dy, dx
    lo, hi = meta.get("pixel_spacing_mm") or (0.7, 0.7)
    mid = 0.5 * (float(lo) + float(hi))
    return mid, mid


def _warn_spacing(spacing: tuple[float, ...] | None, meta: dict[str, Any]) -> None:
    rng = meta.get("pixel_spacing_mm")
    if spacing is None or not rng:
        return
    lo, hi = rng
    inplane = [float(s) for s in spacing[:2]]
    if any(s < lo * 0.8 or s > hi * 1.25 for s in inplane):
        warnings.warn(
            f"in-plane spacing {inplane} mm is outside the {lo}–{hi} mm this model was trained on; "
            "kernel texture scales with pixel size, so results may be off",
            stacklevel=3,
        )


def standardize_volume(
    volume: CTVolume,
    target_kernel: str | None = None,
    *,
    source_kernel: str | None = None,
    model: LoadedModel | str | os.PathLike | None = None,
    force: bool = False,
    plan: ConversionPlan | None = None,
    **options: Any,
) -> tuple[CTVolume, ConversionPlan]:
    """Convert a CT volume to ``target_kernel``, checked and adapted by the domain guard: the entry point
    for whole volumes (the CLI, the Slicer worker and batch jobs use it).

    :func:`LTDiffPPLib.guard.plan_conversion` identifies the source kernel (DICOM header, else
    ``source_kernel``), picks the model for the pair (or checks ``model``), and refuses what the model does
    not know unless ``force``; non-axial stacks are reformatted to axial and back, in-plane pixels outside
    the model's trained range are resampled (cubic B-spline) to it and back. ``options`` go to
    :func:`standardize` (device, steps, solver, seed, batch_size, ensemble, progress, cancel, precision,
    timings). ``plan``: one made already for this volume (then the other guard arguments are not used).
    Returns the converted volume (the input's geometry, float32 HU) and the plan.
    """
    from .guard import plan_conversion

    if plan is None:
        model_ref = model.path if isinstance(model, LoadedModel) else model
        plan = plan_conversion(volume, target_kernel, source_kernel, model_ref, force)
    loaded = model if isinstance(model, LoadedModel) else load_model(plan.model)
    if loaded.net.config.kernel_conditioned:  # one model for many pairs: convert the planned one
        loaded.net.set_pair(plan.source.kernel, plan.target)
    hu = volume.hu
    spacing_zyx = (volume.spacing[2], volume.spacing[1], volume.spacing[0])
    if plan.axes is not None:
        hu = np.ascontiguousarray(hu.transpose(plan.axes))
        spacing_zyx = tuple(spacing_zyx[a] for a in plan.axes)
    inplane, axial_shape_yx = (spacing_zyx[1], spacing_zyx[2]), hu.shape[1:]
    if plan.pixel_mm is not None:
        hu = _resample_slices(hu, inplane, plan.pixel_mm)
    out = standardize(hu, (*(plan.pixel_mm or inplane)[::-1], spacing_zyx[0]), loaded, **options)
    if plan.pixel_mm is not None:
        out = _resample_slices(out, plan.pixel_mm, inplane, shape=axial_shape_yx)
    if plan.axes is not None:
        out = np.ascontiguousarray(out.transpose(np.argsort(plan.axes)))
    return volume.with_hu(out), plan


def _resample_slices(hu: np.ndarray, from_mm: tuple[float, float], to_mm: tuple[float, float],
                     shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resample every (y, x) slice of a (z, y, x) array from ``from_mm`` to ``to_mm`` (dy, dx) pixels with a
    cubic B-spline, keeping the field of view's centre; ``shape``: the (y, x) size wanted (default: the
    same field of view). Outside the old field of view: −1024 HU."""
    import SimpleITK as sitk

    nz, ny, nx = hu.shape
    (fy, fx), (ty, tx) = from_mm, to_mm
    oy, ox = shape if shape is not None else (max(1, round(ny * fy / ty)), max(1, round(nx * fx / tx)))
    ref = sitk.Image(int(ox), int(oy), sitk.sitkFloat32)
    ref.SetSpacing((tx, ty))
    ref.SetOrigin(((nx - 1) * fx / 2 - (ox - 1) * tx / 2, (ny - 1) * fy / 2 - (oy - 1) * ty / 2))
    out = np.empty((nz, oy, ox), dtype=np.float32)
    for k in range(nz):  # slice by slice: a 3-D B-spline would also blur across slices (and needs >= 4 of them)
        image = sitk.GetImageFromArray(np.ascontiguousarray(hu[k], dtype=np.float32))
        image.SetSpacing((fx, fy))
        out[k] = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), sitk.sitkBSpline, -1024.0,
                                                      sitk.sitkFloat32))
    return out
