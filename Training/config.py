"""Training configuration: every hyper-parameter of the three phases, read from a JSON file.

Unknown keys are errors (a typo must not silently fall back to a default). Example:
``Training/configs/tiny.json`` (CI) and ``Training/configs/default.json`` (the shipped model);
``Training/configs/compare-*.json`` train the paper's comparison models (``model.variant``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from LTDiffPPLib.models import ModelConfig

#: the training phases of each model variant (:data:`LTDiffPPLib.models.VARIANTS`): the direct
#: translator has no diffusion (phase 1 only, on pairs), the pixel-space DDPM no autoencoder
VARIANT_PHASES: dict[str, tuple[int, ...]] = {"ltdiff++": (1, 2, 3), "single-scale-ldm": (1, 2, 3),
                                              "unet++": (1,), "pixel-ddpm": (2, 3)}


@dataclass
class PhaseConfig:
    """One phase: ``steps`` optimizer steps at learning rate ``lr`` (cosine decay after ``warmup``)."""

    steps: int = 1000
    lr: float = 2e-4
    warmup: int = 100
    batch_size: int = 8


@dataclass
class TrainConfig:
    """All settings of a training run (patch sizes in pixels, HU normalization from the model defaults).

    Phase 1 trains the UNet++ autoencoder on patches of BOTH kernels with deep supervision
    (``deep_supervision_weights`` over the decoder heads X^{0,1..L}, coarsest first). Phase 2 trains
    the latent denoiser on pairs with the autoencoder frozen (v-prediction MSE). Phase 3 fine-tunes the
    denoiser and the decoder jointly (encoder frozen, so latents keep their meaning): latent fidelity
    (v-MSE) + ``lambda_image`` · L1 of the decoded *sample* (``phase3_sample_steps`` differentiable
    DPM-Solver++ steps) against the target + ``lambda_nps`` · log noise-power-spectrum distance, so that
    the sharp kernel's texture is learned rather than averaged away.

    ``autoencoder_from``: a checkpoint (``.pt``) or model file of an earlier run with the same
    autoencoder architecture; phase 1 is then skipped and its autoencoder used (recorded in the card).

    Comparison models (``model.variant``, see :data:`VARIANT_PHASES`): ``"single-scale-ldm"`` trains as
    above; ``"unet++"`` trains phase 1 only, on pairs (source in, target out: deep-supervision L1 +
    ``lambda_nps`` · noise-power distance); ``"pixel-ddpm"`` trains phase 2 (and phase 3 when its steps
    are > 0) on the pixel-unshuffled images. The steps of a phase the variant does not have must be
    set to 0 in the configuration (an error otherwise, so that no one believes it ran).

    ``sampling`` (steps, solver, grid) becomes the exported model's default for inference;
    ``tensorboard`` writes scalars and source/converted/target panels to ``run_dir/tensorboard``
    (when the ``tensorboard`` package is installed).
    """

    dataset: str = ""
    autoencoder_from: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    patch: int = 128
    phase1: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=2000))
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=4000))
    phase3: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=1000, lr=5e-5, batch_size=4))
    deep_supervision_weights: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    lambda_image: float = 1.0
    lambda_nps: float = 0.1
    phase3_sample_steps: int = 3
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 4
    sampling: dict[str, Any] = field(default_factory=lambda: {"steps": 10, "solver": "dpmpp2m", "grid": "logsnr"})
    tensorboard: bool = True
    export_name: str = "ltdiffpp"
    export_weights_dtype: str = "float16"
    description: str = ""

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    def phase(self, n: int) -> PhaseConfig:
        return (self.phase1, self.phase2, self.phase3)[n - 1]

    @property
    def phases(self) -> tuple[int, ...]:
        """The phases this run trains, in order: the model variant's phases that have steps."""
        return tuple(p for p in VARIANT_PHASES[self.model_config.variant] if self.phase(p).steps > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        _reject_unknown(cls, d, "training config keys")
        kw = dict(d)
        for name in ("phase1", "phase2", "phase3"):
            if name in kw:
                _reject_unknown(PhaseConfig, kw[name], f"keys in {name}")
                kw[name] = PhaseConfig(**kw[name])
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for an invalid architecture, sampling keys, patch size or phase plan."""
        mc = self.model_config
        _reject_unknown_keys(self.sampling, {"steps", "solver", "grid"}, "keys in sampling")
        if self.patch % mc.spatial_multiple:
            raise ValueError(f"patch {self.patch} must be a multiple of {mc.spatial_multiple}")
        own = VARIANT_PHASES[mc.variant]
        extra = [f"phase{p}.steps" for p in (1, 2, 3) if p not in own and self.phase(p).steps != 0]
        if extra:
            raise ValueError(f"variant {mc.variant!r} trains phase(s) {', '.join(map(str, own))} only: "
                             f"set {' and '.join(extra)} to 0")
        if not self.phases:
            raise ValueError(f"nothing to train: every phase of variant {mc.variant!r} has 0 steps")
        if self.autoencoder_from and not mc.latent_diffusion:
            raise ValueError(f"autoencoder_from needs a latent diffusion model, not variant {mc.variant!r}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _reject_unknown(cls: type, d: dict[str, Any], what: str) -> None:
    """A typo in a configuration must not silently fall back to a default."""
    _reject_unknown_keys(d, {f.name for f in fields(cls)}, what)


def _reject_unknown_keys(d: dict[str, Any], known: set[str], what: str) -> None:
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
