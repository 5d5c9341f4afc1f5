"""3D Slicer module: standardize the reconstruction kernel of a CT volume with LTDiff++.

A thin widget over :class:`LTDiffPPLogic`; all MRML and model work lives in the Qt-free ``LTDiffPPLib``
package (``LTDiffPPLib.mrml``), which is tested headless on real MRML nodes.

Python console::

    logic = slicer.util.getModuleLogic("LTDiffPP")
    out = logic.standardize(slicer.util.getNode("CT"), model="/path/model.safetensors", steps=10, seed=0)
"""

from __future__ import annotations

import os
import sys
import threading

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

# Installed extension: LTDiffPPLib sits beside this file. Development ("Add module path" pointing at
# LTDiffPP/): it sits one folder up, in the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "LTDiffPPLib")) and _candidate not in sys.path:
        sys.path.insert(0, _candidate)
        break

#: Python packages LTDiffPPLib needs beyond Slicer's own (torch comes through the PyTorch extension)
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "pydicom": "pydicom>=2.4", "tqdm": "tqdm>=4.60"}


class LTDiffPP(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LTDiffPP"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["LTDiffPP developers"]
        self.parent.helpText = (
            "Converts a CT reconstructed with a non-standard kernel (e.g. Siemens Br40) into the standard kernel "
            "(e.g. Bl64) with LTDiff++, a multiscale latent diffusion model: a UNet++ autoencoder with deep "
            "supervision and a conditional diffusion model in its latent space. Radiomic features of the "
            "converted image agree better with those of the real standard-kernel image.<br>"
            "Select a CT volume and a model file, then Apply. Scripting: "
            "<code>slicer.util.getModuleLogic('LTDiffPP').standardize(volumeNode, model=path)</code>."
        )
        self.parent.acknowledgementText = (
            "Method: Selim et al., 'Multiscale Latent Diffusion Model for Enhanced Feature Extraction from "
            "Medical Images' (LTDiff++), building on UNet++ (Zhou et al., DLMIA 2018) and latent diffusion "
            "for CT standardization (Selim et al., arXiv:2310.05237)."
        )


class LTDiffPPWidget(ScriptedLoadableModuleWidget):
    """Input volume, output volume, model file, steps, seed; Apply turns into Cancel while running."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = LTDiffPPLogic()
        self._cancel = None
        form = qt.QFormLayout()
        self.layout.addLayout(form)

        self.inputSelector = slicer.qMRMLNodeComboBox()
        self.inputSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.inputSelector.addEnabled = False
        self.inputSelector.removeEnabled = False
        self.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.inputSelector.setToolTip("CT volume reconstructed with the model's source kernel")
        form.addRow("Input volume:", self.inputSelector)

        self.outputSelector = slicer.qMRMLNodeComboBox()
        self.outputSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.outputSelector.addEnabled = True
        self.outputSelector.renameEnabled = True
        self.outputSelector.noneEnabled = True
        self.outputSelector.noneDisplay = "(create new volume)"
        self.outputSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow("Output volume:", self.outputSelector)

        self.modelEdit = qt.QLineEdit()
        self.modelEdit.placeholderText = "registered model name or .safetensors file (empty: default model)"
        form.addRow("Model:", self.modelEdit)

        self.stepsSpin = qt.QSpinBox()
        self.stepsSpin.setRange(0, 200)
        self.stepsSpin.specialValueText = "model default"
        form.addRow("Sampling steps:", self.stepsSpin)

        self.seedSpin = qt.QSpinBox()
        self.seedSpin.setRange(0, 2**31 - 1)
        form.addRow("Seed:", self.seedSpin)

        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.connect("clicked(bool)", self.onApply)
        form.addRow(self.applyButton)
        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 1000)
        form.addRow(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        form.addRow(self.statusLabel)
        self.layout.addStretch(1)

    def onApply(self):
        if self._cancel is not None:  # running: the button is "Cancel"
            self._cancel.set()
            self.statusLabel.text = "Cancelling…"
            return
        if not self.logic.checkDependencies():
            return
        self._cancel = threading.Event()
        self.applyButton.text = "Cancel"
        self.statusLabel.text = "Standardizing…"

        def progress(done, total):
            self.progressBar.value = int(1000 * done / max(total, 1))
            slicer.app.processEvents()  # keeps the GUI (and the Cancel button) responsive

        try:
            from LTDiffPPLib.errors import Cancelled

            out = self.logic.standardize(
                self.inputSelector.currentNode(), self.outputSelector.currentNode(),
                model=self.modelEdit.text.strip() or None, steps=self.stepsSpin.value or None,
                seed=self.seedSpin.value, progress=progress, cancel=self._cancel,
            )
            self.outputSelector.setCurrentNode(out)
            slicer.util.setSliceViewerLayers(background=out, fit=True)
            self.statusLabel.text = out.GetDescription()
        except Cancelled:
            self.statusLabel.text = "Cancelled; no output was written."
        except Exception as exc:
            self.statusLabel.text = f"Failed: {exc}"
            slicer.util.errorDisplay(f"Standardization failed:\n{exc}")
        finally:
            self._cancel = None
            self.applyButton.text = "Apply"
            self.progressBar.value = 0


class LTDiffPPLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console; works on the application's scene."""

    def checkDependencies(self) -> bool:
        """Offer to install what LTDiffPPLib needs (torch via the PyTorch extension); True when all present."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay("LTDiffPP needs PyTorch: install the 'PyTorch' extension from the "
                                         "Extension Manager, restart Slicer, and try again.")
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        missing = [spec for module, spec in REQUIREMENTS.items() if not _importable(module)]
        if missing:
            if not slicer.util.confirmOkCancelDisplay(f"LTDiffPP needs these Python packages: {', '.join(missing)}. "
                                                      "Install them now?"):
                return False
            slicer.util.pip_install(" ".join(missing))
        return True

    def standardize(self, inputVolumeNode, outputVolumeNode=None, model=None, device="auto", steps=None, seed=0,
                    progress=None, cancel=None):
        """Standardize ``inputVolumeNode``; returns the output node (a new one when none is given)."""
        from LTDiffPPLib.mrml import standardize_volume_node

        return standardize_volume_node(slicer.mrmlScene, inputVolumeNode, outputVolumeNode, model, device=device,
                                       steps=steps, seed=seed, progress=progress, cancel=cancel)


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


class LTDiffPPTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: a small synthetic CT through a small randomly initialised model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_standardize_synthetic_volume()

    def test_standardize_synthetic_volume(self):
        import tempfile

        import numpy as np

        from LTDiffPPLib.modelfile import init_model, load_model
        from LTDiffPPLib.models import ModelConfig
        from LTDiffPPLib.phantom import qa_phantom

        self.delayDisplay("Standardizing a synthetic volume")
        vol = slicer.util.addVolumeFromArray(qa_phantom((2, 64, 64), spacing_mm=3.2), name="phantom")
        vol.SetSpacing(0.8, 0.8, 2.0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tiny.safetensors")
            init_model(path, ModelConfig(patch=2, ae_widths=(8, 16), latent_channels=4, den_widths=(8, 16),
                                         time_dim=16, groups=4))
            out = LTDiffPPLogic().standardize(vol, model=load_model(path), steps=2, device="cpu")
        self.assertEqual(slicer.util.arrayFromVolume(out).shape, (2, 64, 64))
        self.assertEqual(out.GetSpacing(), vol.GetSpacing())
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(out)).all())
        self.delayDisplay("Test passed")
