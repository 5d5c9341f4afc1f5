"""Image files (.nrrd .nhdr .nii .nii.gz .mha .mhd) through SimpleITK, and conversion to and from SimpleITK."""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputError
from .atomic import atomic_output, check_not_input, write_failure
from .formats import _COMPRESSED_EXTENSIONS, _DETACHED_HEADER_EXTENSIONS, IMAGE_EXTENSIONS, _image_ext
from .volume import CTVolume, _check_hu_range, check_memory

__all__ = ["from_sitk", "read_image", "resample_inplane", "to_sitk", "write_image"]


def _one_line(exc: BaseException) -> str:
    """SimpleITK's multi-line exception text reduced to its reason."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reason = next((ln.split("ERROR:", 1)[1].strip() for ln in lines if "ERROR:" in ln), lines[-1] if lines else "")
    if reason.endswith(":") and lines and lines[-1] not in reason:  # the reason is on the last line (NRRD, ...)
        reason = f"{reason} {lines[-1]}"
    reason = re.sub(r"\b\w+\(0x[0-9a-f]+\): ", "", reason)  # ITK's object addresses ("NrrdImageIO(0x5575e39d): ")
    return reason or type(exc).__name__


#: what each image format's content starts with, and the extension that names it
_FORMAT_EXTENSIONS = {"NRRD": ".nrrd", "MetaImage": ".mha", "NIfTI": ".nii", "gzip-compressed NIfTI": ".nii.gz",
                      "DICOM": "(a DICOM folder)", "PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}
_EXTENSION_FORMATS = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage", ".nii": "NIfTI",
                      ".nii.gz": "gzip-compressed NIfTI"}


def _content_format(path: Path) -> str | None:
    """The image format ``path``'s first bytes show (see ``_FORMAT_EXTENSIONS``), None when unrecognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(400)
    except OSError:
        return None
    if head.startswith(b"NRRD"):
        return "NRRD"
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    if head[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[344:348] == b"n+2\0" or head[4:8] == b"n+2\0":
        return "NIfTI"
    if head.startswith(b"\x1f\x8b"):
        import gzip

        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(400)
        except (OSError, EOFError):
            return None
        return "gzip-compressed NIfTI" if inner[344:348] in (b"n+1\0", b"ni1\0") else None
    text = head.decode("latin-1")
    if any(text.lstrip().startswith(k) for k in ("ObjectType", "NDims", "DimSize", "Comment")) and "=" in text:
        return "MetaImage"
    return None


def _unreadable_reason(path: Path, ext: str) -> str | None:
    """Why ITK cannot read ``path`` when the reason is plain: an empty file, or content of another format
    than its extension says; None when the content looks like its extension (then ITK's reason stands)."""
    try:
        if path.stat().st_size == 0:
            return f"{path} is an empty file (0 bytes); nothing to read."
    except OSError:
        return None
    found, expected = _content_format(path), _EXTENSION_FORMATS.get(ext)
    if found == expected:
        return None
    if found is None:
        return (f"{path}: the content is not a {expected} image (its first bytes match no supported format); "
                "the file is damaged or of another type.")
    return (f"{path}: the content is a {found} file, but the name ends in {ext}; the content does not match the "
            f"extension (rename it to end in {_FORMAT_EXTENSIONS[found]}).")


def from_sitk(image: sitk.Image, source: str = "") -> CTVolume:
    """A SimpleITK image (2-D or 3-D, scalar) as a float32 HU volume; a 2-D image becomes z = 1 (1 mm)."""
    name = source or "image"
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per pixel (vector/RGB); "
                         "a CT image must have one value (HU) per voxel.")
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(f"{name} is {dim}-D; only 2-D slices and 3-D volumes are supported.")
    if 0 in image.GetSize():
        raise InputError(f"{name} is empty (size {image.GetSize()}); there is nothing to standardize.")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    if dim == 2:
        hu, spacing, origin = hu[None], (*spacing, 1.0), (*origin, 0.0)
        direction = (direction[0], direction[1], 0.0, direction[2], direction[3], 0.0, 0.0, 0.0, 1.0)
    if not np.isfinite(hu).all():
        raise InputError(f"{name} contains NaN or infinite voxels; a CT image must be finite HU everywhere.")
    return CTVolume(hu=hu, spacing=spacing, origin=origin, direction=direction, source=source)


def to_sitk(volume: CTVolume) -> sitk.Image:
    """The volume as a float32 SimpleITK image with the same geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.float32))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction)
    return image


def resample_inplane(volume: CTVolume, pixel_mm: float, size: int | None = None) -> CTVolume:
    """The volume resampled in-plane to square ``pixel_mm`` pixels (linear), slices unchanged.

    With ``size``, the new (y, x) grid is ``size`` × ``size`` pixels centred on the old field of view
    (cropping or padding with −1024 HU air); otherwise it covers the old field of view. Kernel texture
    scales with pixel size, so simulated training data is made at the pixel size the model will see.
    """
    if not pixel_mm > 0:
        raise InputError(f"pixel size must be positive, got {pixel_mm} mm")
    sx, sy, sz = volume.spacing
    nz, ny, nx = volume.hu.shape
    new_x = size or max(1, round(nx * sx / pixel_mm))
    new_y = size or max(1, round(ny * sy / pixel_mm))
    d = np.asarray(volume.direction).reshape(3, 3)
    centre = np.asarray(volume.origin) + d @ np.array([(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, 0.0])
    origin = centre - d @ np.array([(new_x - 1) / 2 * pixel_mm, (new_y - 1) / 2 * pixel_mm, 0.0])
    ref = sitk.Image(int(new_x), int(new_y), int(nz), sitk.sitkFloat32)
    ref.SetSpacing((pixel_mm, pixel_mm, sz))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(volume.direction)
    out = sitk.Resample(to_sitk(volume), ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return CTVolume(hu=sitk.GetArrayFromImage(out), spacing=(pixel_mm, pixel_mm, sz),
                    origin=tuple(float(v) for v in origin), direction=volume.direction,
                    dicom_header=volume.dicom_header, source=volume.source)


def read_image(path: str | os.PathLike) -> CTVolume:
    """Read an image file (.nrrd .nhdr .nii .nii.gz .mha .mhd) as float32 HU, shaped (z, y, x)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file {path} {'is a folder' if path.is_dir() else 'does not exist'}.")
    if _image_ext(path) is None:
        raise InputError(f"{path}: unsupported image format; use one of {', '.join(IMAGE_EXTENSIONS)} "
                         "or a DICOM folder.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: size and pixel type, to check memory first
        size, components = reader.GetSize(), reader.GetNumberOfComponents()
        bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
        voxels = math.prod(int(n) for n in size)
        # ITK's buffer, numpy's copy of it, and the float32 HU array
        check_memory(voxels * (2 * components * (int(bits.group(1)) // 8 if bits else 8) + 4), path, size[::-1])
        image = reader.Execute()
    except RuntimeError as exc:
        plain = _unreadable_reason(path, _image_ext(path) or "")
        raise InputError(plain or f"Cannot read image {path}: {_one_line(exc)}") from exc
    except MemoryError as exc:
        raise InputError(f"Cannot read image {path}: out of memory ({exc}).") from exc
    volume = from_sitk(image, source=str(path))
    _check_hu_range(volume.hu, path)
    return volume


def write_image(volume: CTVolume, path: str | os.PathLike, *, overwrite: bool = False,
                provenance: dict[str, str] | None = None) -> Path:
    """Write the volume as a float32 HU image file, format by extension, geometry exact; returns the path.

    ``.nhdr``/``.mhd`` also write their data file beside the header (``.raw.gz``/``.zraw``).
    ``provenance`` (e.g. software versions, model checksum) is stored as ``LTDiffPP_{key}`` header
    fields in NRRD and MetaImage files; NIfTI has no room for it (ITK drops it).
    """
    path = Path(path)
    ext = _image_ext(path)
    if ext is None:
        raise OutputError(f"{path}: unknown image extension; use one of {', '.join(IMAGE_EXTENSIONS)}.")
    check_not_input(path, [volume.source])
    image = to_sitk(volume)
    for key, value in (provenance or {}).items():
        image.SetMetaData(f"LTDiffPP_{key}", " ".join(str(value).split()))  # one line per header field
    with atomic_output(path, overwrite=overwrite) as tmp:
        try:
            if ext in _DETACHED_HEADER_EXTENSIONS:
                _write_detached(image, path, tmp, overwrite)
            else:
                sitk.WriteImage(image, str(tmp), useCompression=ext in _COMPRESSED_EXTENSIONS)
                if ext in (".nii", ".nii.gz"):
                    _check_nifti_length(tmp, volume.hu.nbytes)
        except (RuntimeError, OSError) as exc:
            raise write_failure(path, exc if isinstance(exc, OSError) else _one_line(exc)) from exc
    return path


def _check_nifti_length(path: Path, voxel_bytes: int) -> None:
    """Raise OSError when a NIfTI file holds fewer voxel bytes than written: ITK's NIfTI writer does not
    report a failed write (a full disk leaves a short or empty file and no error)."""
    if path.name.endswith(".gz"):
        import gzip
        import zlib

        total = 0
        try:
            with gzip.open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    total += len(block)
        except (OSError, EOFError, zlib.error):
            total = -1
    else:
        total = path.stat().st_size
    if total < voxel_bytes:
        raise OSError(f"the written file is cut short (holds {max(total, 0)} bytes, the voxels need {voxel_bytes})")


def _write_nhdr(image: sitk.Image, header_path: Path) -> None:
    """Write a detached NRRD (``NAME.nhdr`` + ``NAME.raw.gz``) by splitting an attached one that ITK writes:
    ITK's own detached writer keeps the data file open when a write fails (a full disk stays full)."""
    attached = header_path.with_suffix(".nrrd")
    sitk.WriteImage(image, str(attached), useCompression=True)
    data = attached.read_bytes()
    end = data.index(b"\n\n") + 1  # the header ends at the first blank line
    data_name = f"{header_path.stem}.raw.gz"
    header_path.write_bytes(data[:end] + f"data file: {data_name}\n".encode())
    (header_path.parent / data_name).write_bytes(data[end + 1:])
    attached.unlink()


def _write_detached(image: sitk.Image, path: Path, tmp_header: Path, overwrite: bool) -> None:
    """Write header + data file under their final names in a staging folder, then move the header to
    ``tmp_header`` (which :func:`atomic_output` moves into place) and the data file beside ``path``."""
    stage = tmp_header.with_name(tmp_header.name + ".d")
    stage.mkdir()
    try:
        try:
            if _image_ext(path) == ".nhdr":
                _write_nhdr(image, stage / path.name)
            else:
                sitk.WriteImage(image, str(stage / path.name), useCompression=True)
        except (RuntimeError, OSError) as exc:  # judged before the staging folder is removed (freeing space)
            raise write_failure(path, exc if isinstance(exc, OSError) else _one_line(exc)) from exc
        data_files = [f for f in stage.iterdir() if f.name != path.name]
        for f in data_files:
            if (path.parent / f.name).exists() and not overwrite:
                raise OutputError(f"{path.parent / f.name} already exists; pass overwrite=True or choose another path.")
        os.replace(stage / path.name, tmp_header)
        for f in data_files:
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
