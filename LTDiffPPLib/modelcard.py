"""Model cards without PyTorch: the registry of shipped models and the JSON metadata of a model file.

Everything here reads only JSON — ``resources/registry.json`` and the safetensors header of a model file
(its first 8 bytes give the header's length; the header is JSON) — so the 3D Slicer application process,
the domain guard and ``ltdiffpp info`` can name models and their kernels without importing torch.
:mod:`LTDiffPPLib.modelfile` (which loads weights) re-exports these names; the file format is described there.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFileError

FORMAT = "ltdiffpp-model"
FORMAT_VERSION = 1
RESOURCES = Path(__file__).resolve().parent / "resources"
REGISTRY_PATH = RESOURCES / "registry.json"


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor table and ``__metadata__``); ValueError if malformed."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= 100_000_000:
            raise ValueError(f"bad header length {n}")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file, validated; raises :class:`ModelFileError` with the reason."""
    path = Path(path)
    _refuse_non_safetensors(path)
    try:
        header = read_header(path).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None
    if header.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an LTDiffPP model file (header format is {header.get('format')!r}, expected {FORMAT!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise ModelFileError(
            f"{path}: model format version {header.get('format_version')!r} is not supported by this "
            f"LTDiffPP (which reads version {FORMAT_VERSION}); update LTDiffPP or re-export the model"
        )
    try:
        meta = json.loads(header["ltdiffpp"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: model metadata is missing or not valid JSON ({exc})") from None
    _check_metadata(meta, path)
    return meta


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    file: str
    sha256: str
    source_kernel: str
    target_kernel: str
    description: str = ""
    #: a kernel-conditioned model (source and target ``"any"``): the kernels it converts between
    kernels: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return RESOURCES / "models" / self.file


def registry(path: str | os.PathLike | None = None) -> tuple[list[RegistryEntry], str | None]:
    """The shipped models and the name of the default one (``None`` while no model is shipped)."""
    path = REGISTRY_PATH if path is None else path
    try:
        data = json.loads(Path(path).read_text())
        entries = [RegistryEntry(**{k: tuple(v) if k == "kernels" else v for k, v in e.items()}) for e in data["models"]]
        default = data.get("default")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: model registry is unreadable ({exc})") from None
    if default is not None and default not in {e.name for e in entries}:
        raise ModelFileError(f"{path}: default model {default!r} is not among the registered models")
    return entries, default


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, str | None]:
    """Map a registry name (or ``None`` for the default) or a file path to (path, expected SHA-256 or None)."""
    entries, default = registry()
    if model is None:
        if default is None:
            raise ModelFileError(
                "no default model is shipped yet (registry "
                f"{REGISTRY_PATH} lists none); pass a model file with --model PATH"
            )
        model = default
    by_name = {e.name: e for e in entries}
    if str(model) in by_name:
        e = by_name[str(model)]
        if not e.path.is_file():
            raise ModelFileError(f"registered model {e.name!r} is missing its file {e.path}; reinstall LTDiffPP")
        return e.path, e.sha256
    path = Path(model)
    if path.is_file():
        return path, None
    if path.is_dir():
        raise ModelFileError(f"{model} is a folder, not a model file; pass a .safetensors model file or a registered "
                             f"model name (registered: {', '.join(sorted(by_name)) or 'none'}).")
    names = ", ".join(sorted(by_name)) or "none"
    raise ModelFileError(f"{model}: no such model file, and not a registered model name (registered: {names})")


# ------------------------------------------------------------------------------------------ validation


_PICKLE_OR_ZIP = (b"\x80", b"PK\x03\x04")


def _refuse_non_safetensors(path: Path) -> None:
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file; pass a .safetensors model file.")
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_PICKLE_OR_ZIP):
        raise ModelFileError(
            f"{path}: this is a pickle/PyTorch checkpoint, not safetensors. LTDiffPP never unpickles model "
            "files (a pickle can run arbitrary code); export the weights with Training's exporter"
        )
    if len(head) < 8 or int.from_bytes(head, "little") > os.path.getsize(path):
        raise ModelFileError(f"{path}: not a safetensors file (bad header length)")


def _check_metadata(meta: dict[str, Any], path: Path) -> None:
    required = ("config", "source_kernel", "target_kernel", "hu", "latent", "sampling")
    missing = [k for k in required if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: model metadata lacks {missing}")
    hu = meta["hu"]
    if not all(k in hu for k in ("center", "scale", "min", "max")) or hu["scale"] <= 0 or hu["min"] >= hu["max"]:
        raise ModelFileError(f"{path}: invalid HU normalization {hu}")
    if meta["config"].get("kernel_prior") and ("kernel_prior" not in meta or "residual_std" not in meta["latent"]):
        raise ModelFileError(f"{path}: the model uses a kernel prior but its metadata lacks the prior's gain "
                             "or the residual latent's std")
    reg = prior_regularization(meta)
    floor, cap = reg["floor"], reg["max_gain"]
    if not (isinstance(floor, (int, float)) and 0 < floor <= 1) or not (
            cap is None or (isinstance(cap, (int, float)) and cap >= 1)):
        raise ModelFileError(f"{path}: invalid kernel-prior regularization (floor {floor!r} must be in (0, 1], "
                             f"max_gain {cap!r} null or >= 1)")


def prior_regularization(meta: dict[str, Any]) -> dict[str, Any]:
    """``{"floor", "max_gain"}`` of a kernel-conditioned model's library gain (:func:`LTDiffPPLib.kernels.pair_gain`):
    its metadata's ``kernel_prior`` values, the library's defaults (what such files were trained with) where absent."""
    from .kernels import PAIR_GAIN_FLOOR, PAIR_GAIN_MAX

    prior = meta.get("kernel_prior") if isinstance(meta.get("kernel_prior"), dict) else {}
    return {"floor": prior.get("floor", PAIR_GAIN_FLOOR), "max_gain": prior.get("max_gain", PAIR_GAIN_MAX)}
