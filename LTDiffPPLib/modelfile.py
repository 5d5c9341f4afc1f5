"""Model files: safetensors weights + JSON metadata + SHA-256, and the registry of shipped models.

A model file is one ``.safetensors`` file. Its header's ``__metadata__`` holds
``{"format": "ltdiffpp-model", "format_version": "1", "ltdiffpp": "<JSON>"}`` where the JSON has:

- ``config``: the architecture (:class:`LTDiffPPLib.models.ModelConfig` as a dict; its ``variant`` says
  whether it is LTDiff++ or one of the paper's comparison models, ``"ltdiff++"`` when absent),
- ``source_kernel`` / ``target_kernel``: names of the kernels it converts from / to; ``"any"`` for a
  kernel-conditioned model (``config.kernel_conditioned``), whose ``kernels`` lists the kernels it converts
  between (any ordered pair of them),
- ``hu``: HU normalization ``{"center", "scale", "min", "max"}``: network input = (clip(HU, min, max) − center) / scale,
- ``latent``: per-channel ``mean`` and ``std`` of the encoder output (and ``residual_std`` of the
  residual latent when the kernel prior is on),
- ``kernel_prior`` (when ``config.kernel_prior``): the fitted radial gain, ``{"frequency_step_per_mm",
  "gain", ...}`` (see :class:`LTDiffPPLib.models.KernelPrior`); a kernel-conditioned model has no gain
  here (each pair's comes from the kernel library) but its regularization, ``floor`` and ``max_gain`` (null:
  no cap) of :func:`LTDiffPPLib.kernels.pair_gain` (the library's defaults when absent),
- ``sampling``: defaults ``{"steps", "solver", "grid"}`` (see :mod:`LTDiffPPLib.sampler`),
- ``pixel_spacing_mm``: ``[min, max]`` in-plane spacing seen in training (a warning outside it),
- ``training``: free-form summary (data, hardware, wall time, validation CCC), ``name``, ``description``.

The header also carries ``ltdiffpp_digest``: ``"sha256:<hex>"`` of the header without that key (as
canonical JSON: tensor names, dtypes, shapes, offsets and the metadata) followed by the raw tensor data,
so a file verifies itself: every load recomputes it and refuses a file whose weights or metadata changed.
Files written before the digest existed still load (with a warning unless the registry vouches for them).

Loading parses only that header and raw tensors — never a pickle. Shipped models are listed in
``resources/registry.json`` with their SHA-256, which is checked before a registered model is used; a
file loaded by path whose metadata claims a registered model's name must be that model's file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError
from .modelcard import (FORMAT, FORMAT_VERSION, REGISTRY_PATH, RESOURCES, RegistryEntry,  # noqa: F401 (re-exported)
                        _check_metadata, prior_regularization, read_metadata, registry, resolve_model,
                        sha256_file)
from .io import atomic_output
from .models import LTDiffPPNet, ModelConfig

#: header key of the embedded digest (see the module docstring)
DIGEST_KEY = "ltdiffpp_digest"
_DIGEST_DOMAIN = b"ltdiffpp-model-digest-v1\0"


@dataclass
class LoadedModel:
    """A network ready for inference, with the metadata and checksum of the file it came from."""

    net: LTDiffPPNet
    metadata: dict[str, Any]
    sha256: str
    path: Path

    @property
    def config(self) -> ModelConfig:
        return self.net.config


def default_metadata(
    cfg: ModelConfig,
    *,
    name: str,
    source_kernel: str,
    target_kernel: str,
    description: str = "",
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata with the library's default HU normalization and sampling settings."""
    return {
        "name": name,
        "description": description,
        "config": cfg.to_dict(),
        "source_kernel": source_kernel,
        "target_kernel": target_kernel,
        "hu": {"center": -300.0, "scale": 1000.0, "min": -1024.0, "max": 3071.0},
        "sampling": {"steps": 10, "solver": "dpmpp2m", "grid": "logsnr"},
        "pixel_spacing_mm": [0.5, 1.0],
        "training": training or {},
    }


def save_model(
    net: LTDiffPPNet,
    path: str | os.PathLike,
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
    weights_dtype: str = "float32",
) -> str:
    """Write ``net`` and ``metadata`` atomically to ``path`` (``.safetensors``); return its SHA-256.

    ``weights_dtype`` ``"float16"`` halves the file (weights are upcast to float32 on loading).

    The latent statistics, the kernel prior's gain and the architecture are taken from ``net`` (they
    override whatever ``metadata`` says about them), so a file can never disagree with its weights.
    Other keys of ``metadata["kernel_prior"]`` (e.g. how it was fitted) are kept.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"{path}: model files must end in .safetensors")
    meta = dict(metadata)
    meta["config"] = net.config.to_dict()
    meta["latent"] = {"mean": net.latent_mean.tolist(), "std": net.latent_std.tolist()}
    if net.prior is not None:
        meta["latent"]["residual_std"] = net.residual_std.tolist()
        prior = {k: v for k, v in meta.get("kernel_prior", {}).items() if k != "gain"}
        prior["frequency_step_per_mm"] = net.prior.step
        if not net.config.kernel_conditioned:
            prior["gain"] = [round(float(g), 6) for g in net.prior.gain]
        elif not meta.get("kernels"):  # its gain is the library's, per pair: no table, but its kernels
            raise ModelFileError(f"{path}: a kernel-conditioned model's metadata must list its kernels")
        else:  # and how that gain is regularized
            prior.update(net.prior_regularization)
        meta["kernel_prior"] = prior
    else:
        meta.pop("kernel_prior", None)
    _check_metadata(meta, path)
    if weights_dtype not in ("float32", "float16"):
        raise ModelFileError(f"weights_dtype must be 'float32' or 'float16', not {weights_dtype!r}")
    meta["weights_dtype"] = weights_dtype
    dtype = getattr(torch, weights_dtype)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "ltdiffpp": json.dumps(meta, sort_keys=True)}
    with atomic_output(path, overwrite=overwrite) as tmp:
        _save_with_digest(tensors, tmp, header)
        os.chmod(tmp, 0o644)  # safetensors creates 0600; a model file is meant to be shared
    return sha256_file(path)


def _save_with_digest(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    """Write a safetensors file whose header carries the digest of its own content (:func:`content_digest`).

    The digest leaves out its own key, and the tensor table does not depend on the metadata, so the file
    is written once to compute it and once more with it."""
    header = {k: v for k, v in header.items() if k != DIGEST_KEY}
    save_file(tensors, str(path), metadata=header)
    digest, _ = content_digest(path)
    save_file(tensors, str(path), metadata={**header, DIGEST_KEY: digest})
    if content_digest(path) != (digest, digest):  # pragma: no cover - a safetensors change would show here
        raise ModelFileError(f"{path}: the embedded digest does not verify right after writing; not saved")


def embed_digest(path: str | os.PathLike) -> str:
    """Rewrite a model file written before embedded digests with one (weights and metadata unchanged);
    return its new SHA-256 (update ``registry.json`` when the file is a shipped model)."""
    path = Path(path)
    read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with atomic_output(path, overwrite=True) as tmp:
        _save_with_digest(tensors, tmp, header)
        os.chmod(tmp, 0o644)
    return sha256_file(path)


def content_digest(path: str | os.PathLike) -> tuple[str, str | None]:
    """(the digest of the file's content, the digest it carries or None): SHA-256 over the header without
    :data:`DIGEST_KEY` as canonical JSON, then the raw tensor data. A header that is not a valid
    safetensors JSON header raises :class:`ModelFileError` saying the file is damaged."""
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
            meta = header.get("__metadata__") or {}
            if not isinstance(meta, dict):
                raise ValueError("__metadata__ is not a JSON object")
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{path}: the file is damaged: its safetensors header is not valid ({exc}).") from None
        embedded = meta.pop(DIGEST_KEY, None)
        h = hashlib.sha256(_DIGEST_DOMAIN)
        h.update(json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}", embedded


def verify_model_file(path: str | os.PathLike, metadata: dict[str, Any], *, file_sha256: str | None = None,
                      registered_sha256: str | None = None) -> str:
    """Check that a model file is what it says; return how it was verified (one line, for ``info``).

    Raises :class:`ModelFileError` when the embedded digest does not match the file's weights and
    metadata (damaged or modified), or when the metadata claims the name of a registered model but the
    file is not that model's file (``registered_sha256`` is set when it was loaded by registry name).
    A file without an embedded digest that no registry entry vouches for loads with a warning.
    """
    path = Path(path)
    embedded = _check_embedded_digest(path)
    file_sha256 = file_sha256 or sha256_file(path)
    name = str(metadata.get("name", ""))
    entry = next((e for e in registry()[0] if e.name == name), None)
    if registered_sha256 is None and entry is not None and file_sha256 != entry.sha256:
        raise ModelFileError(f"{path} calls itself the registered model {name!r} but is not its file (SHA-256 "
                             f"{file_sha256}, registered {entry.sha256}); it was modified, or is another model "
                             f"under a shipped name. Use the registered model by name ('{name}'), or save your own "
                             "model under another name.")
    vouched = registered_sha256 is not None or entry is not None
    if embedded is not None:
        return "embedded digest verified" + (", matches registry" if vouched else "")
    if vouched:
        return "matches registry (no embedded digest)"
    warnings.warn(f"{path} carries no embedded digest (written before LTDiffPP verified model files), so damage "
                  "or edits cannot be detected; re-save it with LTDiffPPLib.modelfile.embed_digest.", stacklevel=3)
    return "no embedded digest (unverified)"


def _check_embedded_digest(path: Path) -> str | None:
    """The digest ``path`` carries (None for an older file); :class:`ModelFileError` when it does not match."""
    computed, embedded = content_digest(path)
    if embedded is not None and embedded != computed:
        raise ModelFileError(f"{path}: the file is damaged or was modified: the digest of its weights and metadata "
                             f"({computed}) differs from the one it carries ({embedded}). Reinstall or re-export it; "
                             "never edit a model file by hand.")
    return embedded


def init_model(
    path: str | os.PathLike,
    config: ModelConfig | dict[str, Any] | None = None,
    *,
    seed: int = 0,
    source_kernel: str = "B30f",
    target_kernel: str = "B70f",
    name: str = "untrained",
    overwrite: bool = False,
) -> str:
    """Write a randomly initialised (seeded) model file — the starting point of training; return its SHA-256.

    Its metadata says plainly that it is untrained: its output is no kernel conversion.
    """
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config or {})
    torch.manual_seed(seed)
    net = LTDiffPPNet(cfg)
    # the denoiser's output layer starts at zero (standard for diffusion); a small random one makes an
    # untrained model exercise every path of the sampler instead of returning a constant prediction
    if net.denoiser is not None:
        torch.nn.init.normal_(net.denoiser.out[-1].weight, std=1e-3)
    meta = default_metadata(
        cfg,
        name=name,
        source_kernel=source_kernel,
        target_kernel=target_kernel,
        description=f"UNTRAINED: random initial weights (seed {seed}); not a kernel conversion",
        training={"status": "untrained", "seed": seed},
    )
    return save_model(net, Path(path), meta, overwrite=overwrite)


def load_model(model: str | os.PathLike, *, device: str | torch.device = "cpu", verify_registry: bool = True) -> LoadedModel:
    """Load a model by registry name or path. Registered files are checked against their SHA-256.

    The network is returned in eval mode on ``device`` with float32 weights.
    """
    path, expected = resolve_model(model)
    meta = read_metadata(path)
    digest = sha256_file(path)
    if verify_registry and expected is not None and digest != expected:
        raise ModelFileError(
            f"{path}: checksum mismatch — the registry expects SHA-256 {expected} but the file has {digest}; "
            "the file is damaged or was modified. Reinstall it or pass a model file you trust."
        )
    if verify_registry:
        verify_model_file(path, meta, file_sha256=digest, registered_sha256=expected)
    else:  # loading weights to start training from: the embedded digest still has to hold
        _check_embedded_digest(path)
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        net = LTDiffPPNet(cfg)
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        _check_tensor_names(state, net, path)
        net.load_state_dict(state, strict=True)
        net.set_latent_stats(meta["latent"]["mean"], meta["latent"]["std"])
        if net.prior is not None:
            net.set_residual_std(meta["latent"]["residual_std"])
            if not cfg.kernel_conditioned:  # a conditioned model's gain is set per pair (set_pair)
                net.prior.set_gain(meta["kernel_prior"]["gain"], meta["kernel_prior"]["frequency_step_per_mm"])
            else:
                net.prior_regularization.update(prior_regularization(meta))
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{path}: weights do not match the architecture in its metadata ({exc})") from None
    net.eval().to(device)
    return LoadedModel(net=net, metadata=meta, sha256=digest, path=path)


def _check_tensor_names(state: dict[str, torch.Tensor], net: LTDiffPPNet, path: Path) -> None:
    """One line on tensors missing, unexpected or of the wrong shape, instead of PyTorch's state-dict report."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shaped:
        parts = [f"{len(v)} {what}, e.g. {v[0]}" for what, v in (("missing", missing), ("unexpected", unexpected),
                                                                  ("of another shape", shaped)) if v]
        raise ModelFileError(f"{path}: the file is damaged or does not belong to this LTDiffPP: its weights do not "
                             f"match the architecture in its metadata (tensors: {'; '.join(parts)}).")


# --------------------------------------------------------------------------------------------- registry


# ------------------------------------------------------------------------------------------ validation
