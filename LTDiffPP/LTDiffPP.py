"""3D Slicer module: standardize the reconstruction kernel of a CT volume with LTDiff++, and measure the
radiomic concordance (Lin's CCC) of segments against a reference-kernel volume.

A thin widget (``Resources/UI/LTDiffPP.ui``, bound to :class:`LTDiffPPParameterNode`) over
:class:`LTDiffPPLogic`. All MRML and model work lives in the Qt-free ``LTDiffPPLib`` package
(``LTDiffPPLib.mrml`` and ``LTDiffPPLib.runner``), tested headless on real MRML nodes; long work runs in
a PythonSlicer worker process, so the GUI stays responsive and Cancel kills the worker.

torch is never imported in this (the application's) process: it lives in the worker only, so entering
the module neither freezes Slicer nor locks torch's files on Windows. Nothing is installed without the
user's confirmation, and the self-test installs nothing at all.

Python console::

    logic = slicer.util.getModuleLogic("LTDiffPP")
    out = logic.standardize(slicer.util.getNode("CT"), model="/path/model.safetensors", steps=10, seed=0)
    outputs = logic.standardizeFolder(folderItemID)          # every CT volume of a subject-hierarchy folder
    features, ccc = logic.computeRadiomicsCCC(segmentation, [ct, out], reference)
    nodes = logic.loadSampleData()                           # the digital chest phantom, B30f/B50f/B70f
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Installed extension: LTDiffPPLib sits beside this file. Development ("Add module path" pointing at
# LTDiffPP/): it sits one folder up, in the repository root.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "LTDiffPPLib")):
        if _candidate not in sys.path:
            sys.path.insert(0, _candidate)
        break

#: Python packages the worker needs beyond Slicer's own; torch comes from the PyTorch extension
REQUIREMENTS_FILE = os.path.join(_HERE, "Resources", "requirements.txt")
TORCH_REQUIREMENT = ">=2.4"
DEVICES = ["auto", "cpu", "cuda", "mps"]
#: the library's modules, reloaded (in this order: dependencies first) by the widget's onReload
LIBRARY_MODULES = ("errors", "io", "phantom", "simulation", "radiomics", "concordance", "runner", "sampledata",
                   "mrml")
SCRIPTING_HELP = """
<pre>logic = slicer.util.getModuleLogic("LTDiffPP")
out = logic.standardize(ctNode, model=None, device="auto", steps=None, seed=0)
outputs = logic.standardizeFolder(folderItemID)
features, ccc = logic.computeRadiomicsCCC(segmentationNode, [ctNode, out], referenceNode)</pre>
"""


#
# LTDiffPP
#


class LTDiffPP(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LTDiffPP")
        # the category is translated in Slicer's core context, where the module panel looks it up
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = CONTRIBUTORS
        self.parent.helpText = _(
            "Makes CT scans reconstructed with different kernels comparable for radiomics: it converts a CT "
            "from its reconstruction kernel to the one you choose, smooth to sharp or sharp to smooth (Siemens "
            "B10f, B30f, B50f, B70f, B40f; Philips D), so that its texture looks as if it had been reconstructed "
            "with the target kernel, with LTDiff++, a latent diffusion model. Texture (radiomic) features of the "
            "converted image agree better with those of a real target-kernel image.<br>"
            "Caveats: the shipped models were trained on simulated image pairs (a digital chest phantom and a "
            "chest CT scanned by a CT simulator), for 0.7 mm pixels, and validated on one real Siemens slice; "
            "for research, not for diagnosis. The panel lists the chosen model's caveats.<br>"
            "Select a CT volume and a model, then Apply (the work runs in a separate process; Apply turns into "
            "Cancel), or Apply to all the CT volumes of a folder. Try it without your own data: Sample Data "
            "\u2192 LTDiffPP \u2192 chest phantom. The optional section compares radiomic features of segments "
            "on the input, the output and a reference volume with Lin's concordance correlation coefficient "
            "(CCC).<br>Scripting from the Python console:") + SCRIPTING_HELP + _(
            "See <a href='https://github.com/ltdiffpp/SlicerLTDiffPP/blob/main/docs/SLICER.md'>docs/SLICER.md</a>.")
        self.parent.acknowledgementText = _(
            "Method: Selim et al., 'Multiscale Latent Diffusion Model for Enhanced Feature Extraction from "
            "Medical Images' (LTDiff++), building on UNet++ (Zhou et al., DLMIA 2018) and latent diffusion "
            "for CT kernel standardization (Selim et al., arXiv:2310.05237). Radiomic features: PyRadiomics "
            "(van Griethuysen et al., Cancer Research 2017). Concordance: Lin, Biometrics 1989.")
        # Sample Data (a core module) exists only once the application has started
        if getattr(slicer, "app", None) is not None:
            slicer.app.connect("startupCompleted()", registerSampleData)


#: "Name (Organization)", as the Extensions Index and the module panel show contributors
CONTRIBUTORS = ["LTDiffPP developers (LTDiffPP project)"]


def sampleCacheFolder() -> str:
    """Where the generated sample data are cached: Slicer's cache folder (kept across sessions)."""
    return os.path.join(slicer.app.cachePath, "LTDiffPP")


def registerSampleData(shape=None) -> None:
    """Register the digital chest phantom and its simulated kernels with the Sample Data module. The
    files are made on this machine on first use (about a minute on 2 CPU cores, in the worker) and cached; nothing
    is downloaded. ``shape`` (z, y, x): the sample's size (default: 8 slices of 512², 0.7 mm pixels)."""
    import SampleData
    from LTDiffPPLib.sampledata import SAMPLE_SHAPE, sample_data_source

    shape = tuple(shape or SAMPLE_SHAPE)
    arguments = sample_data_source(sampleCacheFolder(), shape=shape,
                                   thumbnail=os.path.join(_HERE, "Resources", "Icons", "LTDiffPP.png"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        **arguments, customDownloader=lambda source: LTDiffPPLogic().loadSampleData(
            progress=_sampleProgressDialog(), shape=shape))


def _sampleProgressDialog():
    """A progress callback that shows a (Qt) progress dialog while the sample is made."""
    dialog = slicer.util.createProgressDialog(labelText=_("Making the LTDiffPP sample data..."), maximum=100)

    def progress(fraction, message):
        dialog.value = int(100 * fraction)
        dialog.labelText = message
        if fraction >= 1.0:
            dialog.close()
    return progress


#
# LTDiffPPParameterNode
#


@parameterNodeWrapper
class LTDiffPPParameterNode:
    """The module's state, saved with the scene. ``model``: registry name or model file path ("" = the
    model for the kernel pair); ``targetKernel`` ("" = the model's target) and ``sourceKernel`` ("" = from
    the DICOM header, else estimated from the image): kernel library names; ``steps`` 0 = the model's default."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    targetKernel: str = ""
    sourceKernel: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    segmentation: vtkMRMLSegmentationNode
    referenceVolume: vtkMRMLScalarVolumeNode
    quickRadiomics: bool = False


#
# LTDiffPPWidget
#


class LTDiffPPWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node, starts worker tasks through the logic, polls them."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None  # the running LTDiffPPLib.mrml.NodeTask or BatchStandardization
        self._taskKind = None  # "standardize", "batch" or "radiomics"
        self._timer = None

    def onReload(self) -> None:
        """Reload LTDiffPPLib too, so that *Reload* picks up edits of the library, not only of this file."""
        self._cancelTask()
        for name in LIBRARY_MODULES:
            module = sys.modules.get(f"LTDiffPPLib.{name}")
            if module is not None:
                importlib.reload(module)
        if "LTDiffPPLib" in sys.modules:
            importlib.reload(sys.modules["LTDiffPPLib"])
        super().onReload()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LTDiffPP.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LTDiffPPLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.applyAllButton.connect("clicked(bool)", self.onApplyAllButton)
        self.ui.batchFolderSelector.connect("currentItemChanged(vtkIdType)", self._updateButtons)
        self.ui.radiomicsButton.connect("clicked(bool)", self.onRadiomicsButton)
        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.targetKernelComboBox.connect("currentIndexChanged(int)", self.onKernelSelected)
        self.ui.sourceKernelComboBox.connect("currentIndexChanged(int)", self.onKernelSelected)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateKernelInfo)
        self._populateModels()
        self._populateKernels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelTask()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.ui.deviceInfoLabel.text = self.logic.deviceAvailabilityText()  # torch is not imported here

    def exit(self) -> None:
        # the running task keeps being polled: leaving the module does not stop a run
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelTask()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._showModel(self._parameterNode.model)
            self._showKernels()
            self._updateButtons()

    # ------------------------------------------------------------------------------------- model choice
    def _populateModels(self) -> None:
        from LTDiffPPLib.runner import pair_text

        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            entries, default = self.logic.availableModels()
        except Exception as exc:  # an unreadable registry must not break the panel
            entries, default = [], None
            self.ui.modelInfoLabel.text = str(exc)
        if entries:
            combo.addItem(_("Automatic: the model for the kernel pair"), "")
        for entry in entries:
            mark = _(" (default)") if entry["name"] == default else ""
            combo.addItem(f"{entry['name']}{mark}: {pair_text(entry)}", entry["name"])
        if not entries:
            combo.addItem(_("(no model shipped yet: load a model file)"), "")
        combo.blockSignals(wasBlocked)

    def _showModel(self, model: str) -> None:
        """Select ``model`` (registry name or file path) in the combo box, adding a file entry if needed."""
        combo = self.ui.modelComboBox
        index = combo.findData(model)
        if index < 0 and model:
            combo.addItem(os.path.basename(model), model)
            index = combo.findData(model)
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = max(index, 0)
        combo.blockSignals(wasBlocked)
        self._showModelInfo(combo.itemData(combo.currentIndex) or None)

    def _showModelInfo(self, model) -> None:
        self.ui.modelInfoLabel.text = self.logic.modelInfoText(model)
        self.ui.modelCaveatsLabel.text = self.logic.modelCaveatsText(model)

    def onModelSelected(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""
        self._showModelInfo(self.ui.modelComboBox.itemData(index) or None)
        self._updateKernelInfo()

    # ------------------------------------------------------------------------------------ kernel choice
    def _populateKernels(self) -> None:
        targets, sources = self.logic.targetKernels(), self.logic.sourceKernels()
        for combo, auto, names in ((self.ui.targetKernelComboBox, _("Automatic: the model's target kernel"), targets),
                                   (self.ui.sourceKernelComboBox, _("Automatic: DICOM header, else the image"), sources)):
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            combo.addItem(auto, "")
            for name in names:
                combo.addItem(name, name)
            combo.blockSignals(wasBlocked)

    def _showKernels(self) -> None:
        p = self._parameterNode
        for combo, value in ((self.ui.targetKernelComboBox, p.targetKernel), (self.ui.sourceKernelComboBox, p.sourceKernel)):
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = max(combo.findData(value), 0)
            combo.blockSignals(wasBlocked)
        self._updateKernelInfo()

    def onKernelSelected(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.targetKernel = self.ui.targetKernelComboBox.currentData or ""
            self._parameterNode.sourceKernel = self.ui.sourceKernelComboBox.currentData or ""
        self._updateKernelInfo()

    def _updateKernelInfo(self, *args) -> None:
        """Show what Apply would do with the selected volume (detected source kernel, target, model)."""
        p = self._parameterNode
        if not p or not p.inputVolume:
            self.ui.kernelInfoLabel.text = ""
            return
        with slicer.util.tryWithErrorDisplay(_("Could not check the input's kernel."), waitCursor=True):
            self.ui.kernelInfoLabel.text = self.logic.kernelPreviewText(p.inputVolume, p.targetKernel or None,
                                                                       p.sourceKernel or None, p.model or None)

    def onLoadModelButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Load an LTDiffPP model"), "",
                                              _("LTDiffPP model (*.safetensors)"))
        if path and self._parameterNode:
            self._parameterNode.model = path
            self._showModel(path)

    # ------------------------------------------------------------------------------------------- buttons
    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._task is not None
        self.ui.applyButton.text = _("Cancel") if self._taskKind == "standardize" else _("Apply")
        self.ui.applyButton.enabled = (self._taskKind == "standardize") or (not running and bool(p and p.inputVolume))
        self.ui.applyAllButton.text = _("Cancel") if self._taskKind == "batch" else _("Apply to all")
        self.ui.applyAllButton.enabled = (self._taskKind == "batch") or (
            not running and bool(self.ui.batchFolderSelector.currentItem()))
        self.ui.radiomicsButton.text = (_("Cancel") if self._taskKind == "radiomics"
                                        else _("Compute radiomics and CCC"))
        ready = bool(p and p.segmentation and p.referenceVolume and (p.inputVolume or p.outputVolume))
        self.ui.radiomicsButton.enabled = (self._taskKind == "radiomics") or (not running and ready)

    def onApplyButton(self) -> None:
        self._startOrCancel("standardize", _("Could not start the standardization."), lambda p, options: (
            self.logic.standardize(p.inputVolume, p.outputVolume, **options)))

    def onApplyAllButton(self) -> None:
        self._startOrCancel("batch", _("Could not start the batch."), lambda p, options: (
            self.logic.standardizeFolder(self.ui.batchFolderSelector.currentItem(), **options)))

    def _startOrCancel(self, kind: str, errorTitle: str, start) -> None:
        """Cancel the running ``kind`` task, or start one with the panel's settings: ``start(parameterNode,
        options)`` returns the task (the logic call with the model, device, steps, seed and kernels)."""
        if self._taskKind == kind:
            self._cancelTask()
            return
        if not self.logic.checkDependencies():
            self.ui.statusLabel.text = _("Missing dependencies; see the message.")
            return
        p = self._parameterNode
        options = dict(model=p.model or None, device=p.device, steps=p.steps or None, seed=p.seed,
                       waitForCompletion=False, targetKernel=p.targetKernel or None,
                       sourceKernel=p.sourceKernel or None)
        with slicer.util.tryWithErrorDisplay(errorTitle, waitCursor=True):
            self._startPolling(start(p, options), kind)

    def onRadiomicsButton(self) -> None:
        if self._taskKind == "radiomics":
            self._cancelTask()
            return
        p = self._parameterNode
        if not self.logic.checkDependencies(radiomics=True):
            self.ui.statusLabel.text = _("Missing dependencies; see the message.")
            return
        volumes = [v for v in (p.inputVolume, p.outputVolume) if v is not None]
        with slicer.util.tryWithErrorDisplay(_("Could not start the radiomics computation."), waitCursor=True):
            task = self.logic.computeRadiomicsCCC(p.segmentation, volumes, p.referenceVolume,
                                                  imageTypes={"Original": {}} if p.quickRadiomics else None,
                                                  waitForCompletion=False)
            self._startPolling(task, "radiomics")

    # ---------------------------------------------------------------------------------------- polling
    def _startPolling(self, task, kind: str) -> None:
        self._task, self._taskKind = task, kind
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = self.logic.statusText(task)
        self._updateButtons()
        self._timer.start()

    def _onTimer(self) -> None:
        task = self._task
        if task is None:
            self._timer.stop()
            return
        state = task.poll()
        self.ui.progressBar.value = int(1000 * task.progress)
        self.ui.statusLabel.text = self.logic.statusText(task)  # message + the worker's warnings
        if state == "running":
            return
        self._timer.stop()
        kind = self._taskKind
        self._task, self._taskKind = None, None
        try:
            result = task.finish()
        except Exception as exc:
            self.ui.progressBar.value = 0
            if getattr(exc, "kind", None) == "Cancelled":
                self.ui.statusLabel.text = _("Cancelled; nothing was written.")
            else:
                self.ui.statusLabel.text = _("Failed: {error}").format(error=exc)
                slicer.util.errorDisplay(_("LTDiffPP failed:\n{error}").format(error=exc))
        else:
            if kind == "standardize":
                # the result is shown but NOT put into the output selector: the next Apply on another
                # input makes a new node instead of overwriting this one (LTDiffPPLib.mrml.resolve_output_node)
                slicer.util.setSliceViewerLayers(background=result, fit=True)
                self.ui.statusLabel.text = (f"{self.logic.statusText(task)}\n"
                                            f"{result.GetName()}: {result.GetDescription()}")
            elif kind == "batch":
                if result:
                    slicer.util.setSliceViewerLayers(background=result[-1], fit=True)
                self.ui.statusLabel.text = self.logic.statusText(task)
            else:
                self.logic.showRadiomicsResult(result)
                skipped = (_(" Empty segments skipped: {names}.").format(names=", ".join(result.skipped_segments))
                           if result.skipped_segments else "")
                self.ui.statusLabel.text = _("Radiomics and CCC tables are in the subject hierarchy.") + skipped
        finally:
            self._updateButtons()

    def _cancelTask(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._onTimer()  # reports "Cancelled" and restores the buttons


#
# LTDiffPPLogic
#


class LTDiffPPLogic(ScriptedLoadableModuleLogic):
    """Usable from the Python console and from other modules; works on ``slicer.mrmlScene``.

    The MRML work itself is in ``LTDiffPPLib.mrml`` (scene passed explicitly), tested without Slicer.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return LTDiffPPParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------------------------ information
    @staticmethod
    def availableModels():
        """(registry entries as dicts, name of the default model); torch is not needed."""
        from LTDiffPPLib.runner import list_models

        return list_models()

    @staticmethod
    def modelInfoText(model) -> str:
        from LTDiffPPLib.runner import list_models, model_summary, pair_text

        if not model:
            _entries, default = list_models()
            if default is None:
                return _("No model is shipped yet: load a model file (.safetensors).")
            model = default
        try:
            s = model_summary(model)
        except Exception as exc:
            return str(exc)
        text = f"{pair_text(s)}; {s['steps']} steps by default"
        if s["untrained"]:
            text += _("; UNTRAINED model (random weights): output is not a kernel conversion")
        return text

    @staticmethod
    def modelCaveatsText(model) -> str:
        """The model's caveats for the panel (how it was trained, for which kernels, validated on what)."""
        from LTDiffPPLib.runner import model_caveats

        try:
            return "\n".join("\u2022 " + c for c in model_caveats(model or None))
        except Exception as exc:  # an unreadable model file: say so, do not break the panel
            return str(exc)

    @staticmethod
    def targetKernels() -> list:
        """Kernels a shipped model converts to (library names), torch-free."""
        from LTDiffPPLib.guard import registered_pairs

        return sorted({t for _name, _s, t in registered_pairs()})

    @staticmethod
    def sourceKernels() -> list:
        """Library kernels with a known frequency response (those a conversion can start from)."""
        from LTDiffPPLib.kernels import kernel_library

        return [k.name for k in kernel_library().values() if k.has_response]

    @staticmethod
    def kernelPreviewText(inputVolumeNode, targetKernel=None, sourceKernel=None, model=None) -> str:
        """One line: the input's source kernel and how it was found (DICOM header from Slicer's DICOM
        database, given, or estimated from the image), the target and the model — or why Apply would refuse."""
        from LTDiffPPLib.mrml import kernel_preview

        return kernel_preview(inputVolumeNode, targetKernel, sourceKernel, model,
                              dicom_database=getattr(slicer, "dicomDatabase", None))

    @staticmethod
    def statusText(task) -> str:
        """The panel's status line of a running or finished task: its message and every warning the worker
        raised (the warnings are in the application log too)."""
        from LTDiffPPLib.mrml import status_text

        return status_text(task)

    @staticmethod
    def deviceAvailabilityText() -> str:
        """What is installed, WITHOUT importing torch (it is imported only in the worker, which reports the
        device it used): the PyTorch version from its package metadata."""
        from LTDiffPPLib.runner import installed_versions, torch_problem

        problem = torch_problem(TORCH_REQUIREMENT)
        if problem == "missing":
            return _("PyTorch not installed yet (offered on the first Apply)")
        if problem:
            return problem
        return _("PyTorch {version}; the device used is reported when a run starts").format(
            version=installed_versions().get("torch"))

    # ----------------------------------------------------------------------------------- dependencies
    @staticmethod
    def missingDependencies(radiomics: bool = False) -> dict:
        """What the worker lacks, found without importing or installing anything: ``torch`` (None, or
        "missing", or why the installed version does not fit), ``packages`` (requirement lines of
        Resources/requirements.txt not satisfied, names compared as pip compares them) and ``radiomics``
        (True when PyRadiomics is needed and absent)."""
        from LTDiffPPLib.runner import missing_requirements, torch_problem

        return {"torch": torch_problem(TORCH_REQUIREMENT),
                "packages": missing_requirements(REQUIREMENTS_FILE),
                # SlicerRadiomics builds PyRadiomics into its own folder, maybe without pip metadata: look
                # for the importable package (find_spec does not import it)
                "radiomics": bool(radiomics) and importlib.util.find_spec("radiomics") is None}

    def checkDependencies(self, radiomics: bool = False, askConfirmation: bool = True) -> bool:
        """Make sure the worker can run: torch (installed through the PyTorch extension's PyTorchUtils,
        with confirmation; an installed torch is version-checked), the packages of
        Resources/requirements.txt (pip, with confirmation), and for radiomics PyRadiomics from the
        SlicerRadiomics extension. True when everything is there. (The self-test never calls this: it
        installs nothing.)"""
        missing = self.missingDependencies(radiomics)
        if missing["torch"] == "missing":
            try:
                import PyTorchUtils
            except ImportError:
                slicer.util.errorDisplay(_(
                    "LTDiffPP needs PyTorch. Install the 'PyTorch' extension from the Extension Manager, "
                    "restart Slicer, and click Apply again."))
                return False
            # (PyTorchUtils imports torch once it has installed it: the one time torch enters this process)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                             torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        elif missing["torch"]:
            slicer.util.errorDisplay(_(
                "{problem}. Open the 'PyTorch Utils' module, set the version requirement to "
                "'{requirement}', and install PyTorch again; then restart Slicer.").format(
                    problem=missing["torch"], requirement=TORCH_REQUIREMENT))
            return False
        if missing["packages"]:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("LTDiffPP needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing["packages"]))):
                return False
            with slicer.util.displayPythonShell(), slicer.util.WaitCursor():
                slicer.util.pip_install(missing["packages"])
        if missing["radiomics"]:
            slicer.util.errorDisplay(_(
                "Radiomics needs PyRadiomics, which comes with the 'SlicerRadiomics' extension. Install "
                "SlicerRadiomics from the Extension Manager, restart Slicer, and try again."))
            return False
        return True

    # -------------------------------------------------------------------------------------------- work
    @staticmethod
    def _tempDirectory():
        """A fresh folder for a job's temporary files in Slicer's temporary folder (the job deletes it)."""
        if getattr(slicer, "app", None) is None:  # slicer-core, no application: the system temp
            return None
        return slicer.util.tempDirectory("LTDiffPP")

    def standardize(self, inputVolumeNode, outputVolumeNode=None, model=None, device="auto", steps=None, seed=0,
                    waitForCompletion=True, progress=None, targetKernel=None, sourceKernel=None, force=False):
        """Standardize ``inputVolumeNode`` in a worker process.

        ``model``: registry name, ``.safetensors`` path or None (the registry's default); ``steps`` None =
        the model's default. With ``waitForCompletion`` returns the output node (``outputVolumeNode``
        filled, or a new volume beside the input: another input's result is never overwritten), calling
        ``progress(fraction, message)`` meanwhile; otherwise returns the running task (``poll()``,
        ``progress``, ``message``, ``warnings``, ``cancel()``, ``finish()`` → node). A failed or cancelled
        run raises and leaves the scene as it was. The worker's warnings are logged (application log).
        ``targetKernel``: library kernel name (e.g. "B70f"; None = the model's target); ``sourceKernel``:
        the input's kernel when its DICOM header (looked up in Slicer's DICOM database) does not name it —
        otherwise it is estimated from the image; ``force``: convert despite the domain guard's objections.
        """
        from LTDiffPPLib.mrml import start_standardize_volume_node

        task = start_standardize_volume_node(slicer.mrmlScene, inputVolumeNode, outputVolumeNode, model,
                                             device=device, steps=steps, seed=seed, target_kernel=targetKernel,
                                             source_kernel=sourceKernel, force=force,
                                             dicom_database=getattr(slicer, "dicomDatabase", None),
                                             workdir=self._tempDirectory())
        if not waitForCompletion:
            return task
        return task.wait(progress=self._progressWithEvents(progress))

    def standardizeFolder(self, folderItemID, model=None, device="auto", steps=None, seed=0,
                          waitForCompletion=True, progress=None, targetKernel=None, sourceKernel=None, force=False):
        """Standardize every CT volume of a subject-hierarchy folder (or patient, or study), one after
        another through the worker, each into a new volume beside its input. Returns the output nodes
        (``waitForCompletion``) or the running batch (same interface as a single task; ``failures``
        names the volumes that could not be converted)."""
        from LTDiffPPLib.mrml import start_batch_standardize

        batch = start_batch_standardize(slicer.mrmlScene, folderItemID, model, device=device, steps=steps, seed=seed,
                                        target_kernel=targetKernel, source_kernel=sourceKernel, force=force,
                                        dicom_database=getattr(slicer, "dicomDatabase", None),
                                        workdir_factory=self._tempDirectory)
        if not waitForCompletion:
            return batch
        return batch.wait(progress=self._progressWithEvents(progress))

    def loadSampleData(self, progress=None, shape=None):
        """Load the digital chest phantom reconstructed with B30f, B50f and B70f (and its tissue segments).
        Made on this machine by the worker on first use (about a minute on 2 CPU cores) and cached; nothing is
        downloaded. Returns the new nodes, CT volumes first."""
        from LTDiffPPLib.mrml import load_sample_files
        from LTDiffPPLib.runner import SampleJob

        app = getattr(slicer, "app", None)
        cacheRoot = sampleCacheFolder() if app is not None else self.sampleCacheRoot
        job = SampleJob(cacheRoot, shape=shape, temp_root=getattr(app, "temporaryPath", None))
        job.wait(progress=self._progressWithEvents(progress))
        try:
            return load_sample_files(slicer.mrmlScene, job.files())
        finally:
            job.cleanup()

    #: where loadSampleData caches outside the application (slicer-core scripts and tests)
    sampleCacheRoot = os.path.join(os.path.expanduser("~"), ".cache", "LTDiffPP")

    def computeRadiomicsCCC(self, segmentationNode, volumeNodes, referenceVolumeNode, imageTypes=None, params=None,
                            waitForCompletion=True, progress=None):
        """Radiomic features of every segment on ``volumeNodes`` and ``referenceVolumeNode``, and Lin's CCC
        of each volume against the reference across segments, per feature class.

        Returns ``(featureTable, cccTable)`` (``vtkMRMLTableNode``; a bar chart of the CCC per class is
        made too, all in one subject-hierarchy folder), or the running task without
        ``waitForCompletion`` (its ``finish()`` gives the full result). ``imageTypes`` (e.g.
        ``{"Original": {}}``) and ``params`` (a parameter file) override the shipped settings.
        """
        from LTDiffPPLib.mrml import start_radiomics_ccc

        task = start_radiomics_ccc(slicer.mrmlScene, segmentationNode, volumeNodes, referenceVolumeNode,
                                   params=params, image_types=imageTypes, workdir=self._tempDirectory())
        if not waitForCompletion:
            return task
        result = task.wait(progress=self._progressWithEvents(progress))
        return result.feature_table, result.ccc_table

    @staticmethod
    def showRadiomicsResult(result) -> None:
        """Show the CCC table and chart in a plot + table layout."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(result.ccc_table.GetID())
        selection.SetActivePlotChartID(result.chart.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.app.applicationLogic().PropagatePlotChartSelection()

    @staticmethod
    def _progressWithEvents(progress):
        """Blocking runs inside the application still repaint (and log progress)."""
        def callback(fraction, message):
            if progress is not None:
                progress(fraction, message)
            if slicer.app is not None:
                slicer.app.processEvents()
        return callback


#
# LTDiffPPTest
#


class LTDiffPPTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer (*Reload and Test*, and the extension factory's ctest).

    It never installs anything: the factory runs it on a shared Slicer, where downloading PyTorch (GBs)
    is not acceptable. The logic tests run a worker, which needs PyTorch and the packages of
    requirements.txt; they run when those are already installed, or when ``testLogic`` is set to True,
    and otherwise are reported as not run (a message, not a skipTest: skipTest inside runTest shows an
    exception dialog on *Reload and Test*). The GUI binding test always runs.
    """

    #: run the worker tests even if the check below finds something missing (they then fail loudly)
    testLogic = False

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_parameter_node_and_gui_binding()
        missing = LTDiffPPLogic.missingDependencies()
        if not self.testLogic and (missing["torch"] or missing["packages"]):
            self.delayDisplay(_("LTDiffPP logic tests not run: the worker's Python packages are not installed "
                                "(the self-test installs nothing). Missing: {missing}").format(
                                    missing=", ".join(([f"torch ({missing['torch']})"] if missing["torch"] else [])
                                                      + missing["packages"])))
            return
        self.setUp()
        self.test_standardize_synthetic_volume()
        self.setUp()
        self.test_cancel_leaves_no_output()

    def _tinyModel(self, folder):
        from LTDiffPPLib.modelfile import init_model
        from LTDiffPPLib.models import ModelConfig

        path = os.path.join(folder, "tiny.safetensors")
        init_model(path, ModelConfig(patch=2, ae_widths=(8, 16), latent_channels=4, den_widths=(8, 16),
                                     time_dim=16, groups=4), name="tiny-selftest")
        return path

    def _phantom(self, shape=(2, 64, 64)):
        from LTDiffPPLib.phantom import qa_phantom

        vol = slicer.util.addVolumeFromArray(qa_phantom(shape, spacing_mm=3.2), name="phantom")
        vol.SetSpacing(0.8, 0.8, 2.0)
        vol.SetOrigin(-20.0, 10.0, 5.0)
        return vol

    def test_standardize_synthetic_volume(self):
        import numpy as np

        self.delayDisplay("Standardizing a synthetic volume in a worker process")
        vol = self._phantom()
        tmp = slicer.util.tempDirectory("LTDiffPPTest")
        fractions = []
        out = LTDiffPPLogic().standardize(vol, model=self._tinyModel(tmp), steps=2, device="cpu",
                                          progress=lambda f, m: fractions.append(f), sourceKernel="B30f")
        self.assertEqual(fractions[-1], 1.0)
        self.assertEqual(slicer.util.arrayFromVolume(out).shape, (2, 64, 64))
        self.assertEqual(out.GetSpacing(), vol.GetSpacing())
        self.assertEqual(out.GetOrigin(), vol.GetOrigin())
        self.assertIn("seed 0", out.GetDescription())
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(out)).all())
        sh = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(out)), sh.GetItemParent(sh.GetItemByDataNode(vol)))
        self.delayDisplay("Test passed")

    def test_cancel_leaves_no_output(self):
        import time

        vol = self._phantom((16, 64, 64))
        n = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        tmp = slicer.util.tempDirectory("LTDiffPPTest")
        task = LTDiffPPLogic().standardize(vol, model=self._tinyModel(tmp), steps=100, device="cpu",
                                           waitForCompletion=False, sourceKernel="B30f")
        deadline = time.time() + 120
        while task.poll() == "running" and task.progress == 0 and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        task.cancel()
        self.assertEqual(task.state, "cancelled")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), n)
        self.delayDisplay("Cancel test passed")

    def test_parameter_node_and_gui_binding(self):
        widget = slicer.modules.ltdiffpp.widgetRepresentation().self()
        vol = self._phantom()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.inputVolume = vol
        parameterNode.steps = 7
        parameterNode.device = "cpu"
        self.assertEqual(widget.ui.inputSelector.currentNode(), vol)
        self.assertEqual(widget.ui.stepsSpinBox.value, 7)
        self.assertEqual(widget.ui.deviceComboBox.currentText, "cpu")
        self.assertTrue(widget.ui.applyButton.enabled)
        self.assertTrue(widget.ui.modelCaveatsLabel.text)
        logging.info("GUI binding test passed")
