"""The library's own exception types.

Everything that goes wrong because of what a user handed us (a file, a folder, a model, an output path)
raises a subclass of :class:`LTDiffPPError` with a message that names the file and the problem, so that
the CLI can print one line and exit non-zero, and the Slicer module can show it in a dialog.
"""

from __future__ import annotations


class LTDiffPPError(Exception):
    """Base class of every error LTDiffPPLib raises on purpose."""


class InputError(LTDiffPPError, ValueError):
    """An input image, DICOM folder or array is unusable (missing, malformed, ambiguous)."""


class ModelFileError(LTDiffPPError):
    """A model file is missing, of the wrong format, tampered with, or names an unknown model."""


class OutputError(LTDiffPPError):
    """An output path exists (and overwriting was not asked for) or cannot be written."""


class Cancelled(LTDiffPPError):
    """A long job was cancelled through its cancel event."""
