"""LTDiffPPLib: CT reconstruction-kernel standardization with LTDiff++ (multiscale latent diffusion).

Qt-free; used by the ``ltdiffpp`` CLI, the 3D Slicer module and ``Training``. Modules:

- :mod:`~LTDiffPPLib.io` — read/write CT volumes (DICOM series, NRRD, NIfTI, MHA), atomically
- :mod:`~LTDiffPPLib.models` — the UNet++ autoencoder and the conditional latent denoiser
- :mod:`~LTDiffPPLib.sampler` — noise schedule, DDIM and DPM-Solver++ samplers
- :mod:`~LTDiffPPLib.modelfile` — model files (safetensors + JSON metadata + SHA-256) and the registry
- :mod:`~LTDiffPPLib.inference` — :func:`standardize`, the one entry point for conversion
- :mod:`~LTDiffPPLib.phantom` — built-in digital phantoms
"""

__version__ = "0.1.0"

from .errors import Cancelled, InputError, LTDiffPPError, ModelFileError, OutputError  # noqa: E402

__all__ = ["__version__", "LTDiffPPError", "InputError", "ModelFileError", "OutputError", "Cancelled"]
