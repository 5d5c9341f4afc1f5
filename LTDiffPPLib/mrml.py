"""MRML logic of the Slicer module, Qt-free: volume nodes ↔ CTVolume, standardization of a volume node
(in process, or in a worker subprocess with progress and cancel), segment radiomics with CCC tables and
a bar chart, subject-hierarchy placement.

Works in the Slicer application and, for tests and servers, on the ``slicer-core`` package
(:func:`headless_scene` makes a scene with the module logics registered). The scene is always passed
explicitly (no ``slicer.mrmlScene``). Slicer stores geometry in RAS, the library (like DICOM and ITK)
in LPS: the two differ by a sign flip of x and y.

Nothing is created or changed in the scene until a run has succeeded: a failed or cancelled
standardization or radiomics run leaves no half-filled node behind. A batch (:func:`start_batch_standardize`)
converts the CT volumes of a subject-hierarchy folder one after another through the same worker; each
output is added when its own run has succeeded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .io import CTVolume

if TYPE_CHECKING:  # torch is imported only where a model runs in this process
    import pandas as pd

    from .inference import ProgressCallback
    from .modelfile import LoadedModel
    from .radiomics import Roi
    from .runner import Job

_LPS_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


def volume_from_node(node: Any) -> CTVolume:
    """A scalar volume node's voxels (copied, float32 HU, (z, y, x)) and geometry (LPS) as a CTVolume."""
    import slicer.util
    import vtk

    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{getattr(node, 'GetName', lambda: node)()}: expected a scalar (CT) volume node")
    if node.GetImageData() is None:
        raise InputError(f"volume node {node.GetName()!r} holds no image data")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume node {node.GetName()!r} is not a single-component (greyscale) volume")
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    dir_ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    return CTVolume(
        hu=np.array(slicer.util.arrayFromVolume(node), dtype=np.float32),
        spacing=node.GetSpacing(),
        origin=tuple(_LPS_RAS @ np.array(node.GetOrigin())),
        direction=tuple((_LPS_RAS @ dir_ras).ravel()),
        source=node.GetName(),
    )


def update_node_from_volume(node: Any, volume: CTVolume) -> None:
    """Set a scalar volume node's voxels and geometry (converted LPS → RAS) from a CTVolume."""
    import slicer.util
    import vtk

    dir_ras = _LPS_RAS @ np.array(volume.direction).reshape(3, 3)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, dir_ras[r, c])
    node.SetIJKToRASDirectionMatrix(m)
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*(_LPS_RAS @ np.array(volume.origin)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(volume.hu, dtype=np.float32))


# ------------------------------------------------------------------------------------------- scene
#: module logics a headless scene needs for what this module does (tables, plots, segment export, SH)
_LOGICS = ("vtkMRMLColorLogic", "vtkSlicerSubjectHierarchyModuleLogic", "vtkSlicerSegmentationsModuleLogic",
           "vtkSlicerTablesLogic", "vtkSlicerPlotsLogic")


def headless_scene() -> Any:
    """A new MRML scene with the logics of colors, subject hierarchy, segmentations, tables and plots
    registered, as the Slicer application has them (for scripts, servers and tests on slicer-core)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    logics = []
    for name in _LOGICS:
        logic = getattr(slicer, name)()
        logic.SetMRMLScene(scene)
        logics.append(logic)
    scene._ltdiffpp_logics = logics  # keep them alive as long as the scene
    return scene


def subject_hierarchy(scene: Any) -> Any:
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise InputError("the scene has no subject hierarchy")
    return sh


def sh_item(scene: Any, node: Any) -> int:
    """The subject-hierarchy item of ``node`` (created under the scene item when the node has none yet:
    the Slicer application creates items itself, a headless scene does not)."""
    sh = subject_hierarchy(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def place_beside(scene: Any, node: Any, sibling: Any) -> None:
    """Move ``node`` into the subject-hierarchy folder/study that holds ``sibling``."""
    sh = subject_hierarchy(scene)
    parent = sh.GetItemParent(sh_item(scene, sibling)) or sh.GetSceneItemID()
    sh.SetItemParent(sh_item(scene, node), parent)


def _ijk_to_ras(node: Any) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def same_grid(a: Any, b: Any, tol: float = 1e-4) -> bool:
    """True when two volume nodes have the same voxel grid (dimensions, IJK→RAS, parent transform)."""
    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    return (tuple(a.GetImageData().GetDimensions()) == tuple(b.GetImageData().GetDimensions())
            and np.allclose(_ijk_to_ras(a), _ijk_to_ras(b), atol=tol)
            and a.GetTransformNodeID() == b.GetTransformNodeID())


# ---------------------------------------------------------------------------------- standardization
def _describe_output(meta: Mapping[str, Any], sha256: str, solver: str, steps: int, seed: int) -> str:
    return (f"LTDiffPP {meta['source_kernel']} -> {meta['target_kernel']}; model {meta.get('name', '')} "
            f"(sha256 {sha256[:12]}); {solver} {steps} steps; seed {seed}")


def resolve_output_node(input_node: Any, output_node: Any | None) -> Any | None:
    """The output rule: a new node for every input unless the user chose one. ``output_node`` is kept
    when it is not an LTDiffPP result, or is the result of this same input (a re-run overwrites it); the
    result of ANOTHER input is never overwritten (the selector still showing the last result must not
    make the next Apply on another volume replace it): None is returned, i.e. a new node."""
    if output_node is None:
        return None
    source = output_node.GetAttribute("LTDiffPP.source_volume")
    if source and source != input_node.GetID():
        return None
    return output_node


def _check_output_node(input_node: Any, output_node: Any | None) -> None:
    if output_node is None:
        return
    if output_node is input_node or output_node.GetID() == input_node.GetID():
        raise InputError("the output volume must differ from the input volume; choose or create another one")
    if not output_node.IsA("vtkMRMLScalarVolumeNode") or output_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"output {output_node.GetName()!r} is not a scalar volume node")


def _store_output(scene: Any, input_node: Any, output_node: Any | None, hu: np.ndarray, *, target_kernel: str,
                  description: str, attributes: Mapping[str, str]) -> Any:
    """Create (when None) or fill the output node with ``hu`` on the input's exact grid; name,
    description, transform, attributes and subject-hierarchy place beside the input."""
    import slicer.util
    import vtk

    if output_node is None:
        name = scene.GenerateUniqueName(f"{input_node.GetName()}_{target_kernel}")
        output_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    m = vtk.vtkMatrix4x4()
    input_node.GetIJKToRASMatrix(m)
    output_node.SetIJKToRASMatrix(m)
    slicer.util.updateVolumeFromArray(output_node, np.ascontiguousarray(hu, dtype=np.float32))
    output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    output_node.SetDescription(description)
    for key, value in attributes.items():
        output_node.SetAttribute(key, str(value))
    output_node.SetAttribute("LTDiffPP.source_volume", input_node.GetID())
    display = input_node.GetDisplayNode()
    if output_node.GetDisplayNode() is None and display is not None:
        output_node.CreateDefaultDisplayNodes()
        if output_node.GetDisplayNode() is not None:
            output_node.GetDisplayNode().SetAutoWindowLevel(False)
            output_node.GetDisplayNode().SetWindowLevel(display.GetWindow(), display.GetLevel())
    place_beside(scene, output_node, input_node)
    sh = subject_hierarchy(scene)
    sh.SetItemAttribute(sh_item(scene, output_node), "LTDiffPP.description", description)
    return output_node


def standardize_volume_node(
    scene: Any,
    input_node: Any,
    output_node: Any | None = None,
    model: LoadedModel | str | None = None,
    *,
    device: str = "auto",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Any:
    """Standardize ``input_node`` in THIS process into ``output_node`` (a new node when None); return it.

    The output keeps the input's geometry and parent transform, sits beside the input in the subject
    hierarchy, and its name and description say model, kernels, steps and seed. Nothing is created or
    changed unless the whole volume was converted: a failure or cancel leaves the scene as it was.
    (The Slicer module uses :func:`start_standardize_volume_node`, which runs in a worker process.)
    """
    from .inference import standardize
    from .modelfile import LoadedModel, load_model

    _check_output_node(input_node, output_node)
    volume = volume_from_node(input_node)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    meta = loaded.metadata
    steps = int(meta["sampling"]["steps"] if steps is None else steps)
    hu = standardize(volume.hu, volume.spacing, loaded, device=device, steps=steps, seed=seed,
                     batch_size=batch_size, progress=progress, cancel=cancel)
    solver = meta["sampling"]["solver"]
    return _store_output(scene, input_node, output_node, hu, target_kernel=meta["target_kernel"],
                         description=_describe_output(meta, loaded.sha256, solver, steps, seed),
                         attributes={"LTDiffPP.model_sha256": loaded.sha256, "LTDiffPP.steps": steps,
                                     "LTDiffPP.seed": seed, "LTDiffPP.source_kernel": meta["source_kernel"],
                                     "LTDiffPP.target_kernel": meta["target_kernel"]})


class NodeTask:
    """A worker job (:class:`~LTDiffPPLib.runner.Job`) whose result goes into MRML nodes on :meth:`finish`.

    Poll it (``state = task.poll()``; ``task.progress``, ``task.message``) from a GUI timer, or block
    with :meth:`wait`. :meth:`cancel` kills the worker; nothing is added to the scene.
    """

    def __init__(self, job: Job):
        self.job = job
        self._finished = False
        self._result: Any = None

    @property
    def state(self) -> str:
        return self.job.state

    @property
    def progress(self) -> float:
        return self.job.progress

    @property
    def message(self) -> str:
        return self.job.message

    @property
    def warnings(self) -> list[str]:
        """Every warning the worker raised (also in the application log)."""
        return self.job.warnings

    def start(self) -> NodeTask:
        self.job.start()
        return self

    def poll(self) -> str:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()

    def wait(self, timeout: float | None = None, progress: Callable[[float, str], None] | None = None) -> Any:
        """Block until done and :meth:`finish`; raises :class:`~LTDiffPPLib.runner.JobError` on failure/cancel."""
        self.job.wait(timeout=timeout, progress=progress)
        return self.finish()

    def finish(self) -> Any:
        if not self._finished:
            try:
                self._result = self._finish()
            finally:
                self.job.cleanup()
            self._finished = True
        return self._result

    def _finish(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class VolumeStandardization(NodeTask):
    """Standardization of a volume node in a worker process; :meth:`finish` returns the output node."""

    def __init__(self, scene: Any, input_node: Any, output_node: Any | None, job: Job):
        super().__init__(job)
        self.scene, self.input_node, self.output_node = scene, input_node, output_node

    def _finish(self) -> Any:
        from .runner import StandardizeJob

        assert isinstance(self.job, StandardizeJob)
        result = self.job.raise_for_state()
        if self.scene.GetNodeByID(self.input_node.GetID()) is not self.input_node:
            raise InputError("the input volume was removed from the scene while it was being standardized")
        hu = self.job.output_volume().hu
        if hu.shape != tuple(reversed(self.input_node.GetImageData().GetDimensions())):
            raise InputError("the input volume changed size while it was being standardized; run again")
        model = result["model"]
        self.output_node = _store_output(
            self.scene, self.input_node, self.output_node, hu, target_kernel=model["target_kernel"],
            description=result["description"],
            attributes={"LTDiffPP.model_sha256": model["sha256"], "LTDiffPP.model": model["name"],
                        "LTDiffPP.steps": result["steps"], "LTDiffPP.seed": result["seed"],
                        "LTDiffPP.source_kernel": model["source_kernel"],
                        "LTDiffPP.target_kernel": model["target_kernel"]})
        return self.output_node


def node_dicom_kernel(node: Any, dicom_database: Any = None) -> tuple[str, str] | None:
    """(Manufacturer, ConvolutionKernel) of the DICOM series a volume node was loaded from, or None.

    From the node's attributes ``DICOM.Manufacturer`` / ``DICOM.ConvolutionKernel`` when present, else
    from ``dicom_database`` (Slicer: ``slicer.dicomDatabase``) for the first of the node's
    ``DICOM.instanceUIDs`` (tags 0008,0070 and 0018,1210; multi-valued kernels keep their '\\')."""
    kernel = node.GetAttribute("DICOM.ConvolutionKernel")
    if kernel:
        return node.GetAttribute("DICOM.Manufacturer") or "", kernel
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids or dicom_database is None:
        return None
    kernel = dicom_database.instanceValue(uids[0], "0018,1210")
    return (dicom_database.instanceValue(uids[0], "0008,0070") or "", kernel) if kernel else None


def start_standardize_volume_node(scene: Any, input_node: Any, output_node: Any | None = None, model: Any = None,
                                  *, device: str = "auto", steps: int | None = None, seed: int = 0,
                                  batch_size: int | None = None, target_kernel: str | None = None,
                                  source_kernel: str | None = None, force: bool = False, dicom_database: Any = None,
                                  python: str | None = None,
                                  workdir: str | os.PathLike | None = None, start: bool = True) -> VolumeStandardization:
    """Standardize ``input_node`` in a worker process (the GUI stays responsive); returns the running task.

    ``task.wait()`` (scripts) or ``task.poll()`` + ``task.finish()`` (GUI timer) gives the output node:
    ``output_node`` filled (see :func:`resolve_output_node`: another input's result is never
    overwritten), or a new node beside the input. ``task.warnings`` lists what the worker warned about.
    ``workdir``: an empty folder for the temporary files, taken over and deleted at the end (Slicer:
    ``slicer.util.tempDirectory()``); default: the system temp. See :func:`standardize_volume_node`.
    ``target_kernel``, ``source_kernel``, ``force``: as for ``ltdiffpp standardize``; the worker's domain
    guard reads the source kernel from the node's DICOM header (:func:`node_dicom_kernel`), else from
    ``source_kernel``, else estimates it from the image, and refuses what the model does not know.
    """
    from .runner import StandardizeJob

    output_node = resolve_output_node(input_node, output_node)
    _check_output_node(input_node, output_node)
    if steps is not None and int(steps) < 1:
        raise InputError(f"sampling steps must be >= 1 (or None for the model's default), got {steps}")
    volume = volume_from_node(input_node)
    job = StandardizeJob(volume, model, device=device, steps=steps, seed=seed, batch_size=batch_size, python=python,
                         target_kernel=target_kernel, source_kernel=source_kernel, force=force,
                         dicom_kernel=node_dicom_kernel(input_node, dicom_database), workdir=workdir)
    task = VolumeStandardization(scene, input_node, output_node, job)
    return task.start() if start else task


def status_text(task: Any) -> str:
    """The panel's status line for a task (single or batch): its message, then one line per warning."""
    lines = [task.message] if task.message else []
    lines += [f"Warning: {w}" for w in task.warnings]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- batch
#: subject-hierarchy attribute the DICOM import puts on a series item (Slicer's DICOM.Modality)
_MODALITY_ATTRIBUTE = "DICOM.Modality"


def ct_volumes_in_folder(scene: Any, folder_item: int) -> list[Any]:
    """The CT volumes below a subject-hierarchy item (folder, patient or study; all levels; a volume's
    own item gives that volume), in hierarchy order: scalar volumes that are not label maps, not LTDiffPP results, and not of another
    DICOM modality (MR, PT, ...)."""
    import vtk

    sh = subject_hierarchy(scene)
    if not folder_item or folder_item == sh.GetInvalidItemID():
        raise InputError("choose a folder (or patient, or study) that holds CT volumes")
    children = vtk.vtkIdList()
    sh.GetItemChildren(folder_item, children, True)
    items = [folder_item] + [children.GetId(i) for i in range(children.GetNumberOfIds())]  # a volume item: itself
    nodes = []
    for item in items:
        node = sh.GetItemDataNode(item)
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        if node.GetAttribute("LTDiffPP.source_volume"):
            continue
        modality = sh.GetItemAttribute(item, _MODALITY_ATTRIBUTE)
        if modality and modality.upper() != "CT":
            continue
        nodes.append(node)
    return nodes


class BatchStandardization:
    """Standardization of several volume nodes one after another, each through its own worker run (the
    same worker program, one at a time). The same polling interface as a single task: ``poll()``,
    ``state``, ``progress`` (over the whole batch), ``message``, ``warnings``, ``cancel()``,
    ``finish()`` (→ the output nodes made), ``wait()``.

    Each output node is added as soon as its own run has succeeded. A volume that fails is skipped and
    reported in ``failures`` (name → message), one that already has the target kernel in ``skipped``;
    Cancel stops the running conversion (nothing of it is
    written) and the rest of the batch; what was already converted stays.
    """

    def __init__(self, scene: Any, input_nodes: Sequence[Any], model: Any = None, *, device: str = "auto",
                 steps: int | None = None, seed: int = 0, batch_size: int | None = None, python: str | None = None,
                 target_kernel: str | None = None, source_kernel: str | None = None, force: bool = False,
                 dicom_database: Any = None, workdir_factory: Callable[[], str | os.PathLike] | None = None):
        if not input_nodes:
            raise InputError("no CT volumes to standardize")
        if steps is not None and int(steps) < 1:
            raise InputError(f"sampling steps must be >= 1 (or None for the model's default), got {steps}")
        self.scene, self.inputs = scene, list(input_nodes)
        self._options = {"device": device, "steps": steps, "seed": seed, "batch_size": batch_size, "python": python,
                         "target_kernel": target_kernel, "source_kernel": source_kernel, "force": force,
                         "dicom_database": dicom_database}
        self.model = model
        self._workdir_factory = workdir_factory
        self.outputs: list[Any] = []
        self.failures: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.warnings: list[str] = []
        self.state = "not started"
        self.index = 0
        self._task: VolumeStandardization | None = None
        self._message = ""

    @property
    def progress(self) -> float:
        n = len(self.inputs)
        if self.state == "done":
            return 1.0
        current = self._task.progress if self._task is not None else 0.0
        return min(1.0, (self.index + current) / n)

    @property
    def message(self) -> str:
        if self._task is not None and self.state == "running":
            name = self.inputs[self.index].GetName()
            return f"Volume {self.index + 1} of {len(self.inputs)} ({name}): {self._task.message}"
        return self._message

    def start(self) -> BatchStandardization:
        self.state = "running"
        self._start_next()
        return self

    def _start_next(self) -> None:
        while self.index < len(self.inputs):
            node = self.inputs[self.index]
            try:
                workdir = self._workdir_factory() if self._workdir_factory is not None else None
                self._task = start_standardize_volume_node(self.scene, node, None, self.model, workdir=workdir,
                                                           **self._options)
                return
            except Exception as exc:  # noqa: BLE001 - a bad volume must not stop the batch
                self.failures[node.GetName()] = str(exc)
                self.index += 1
        self._task = None
        self.state = "done"
        made = len(self.outputs)
        self._message = f"Batch done: {made} of {len(self.inputs)} volumes standardized"
        if self.skipped:
            self._message += f"; {len(self.skipped)} already had the target kernel"
        if self.failures:
            self._message += "; failed: " + "; ".join(f"{k}: {v}" for k, v in self.failures.items())

    def poll(self) -> str:
        if self.state != "running" or self._task is None:
            return self.state
        state = self._task.poll()
        if state == "running":
            return self.state
        node = self.inputs[self.index]
        try:
            self.outputs.append(self._task.finish())
        except Exception as exc:  # noqa: BLE001 - reported, the batch goes on
            if getattr(exc, "kind", "") == "NothingToConvert":  # already the target kernel
                self.skipped[node.GetName()] = str(exc)
            else:
                self.failures[node.GetName()] = str(exc)
        name = node.GetName()
        self.warnings += [w if w.startswith(f"{name}: ") else f"{name}: {w}" for w in self._task.warnings]
        self.index += 1
        self._start_next()
        return self.state

    def cancel(self) -> None:
        if self.state != "running":
            self.state = "cancelled" if self.state == "not started" else self.state
            return
        if self._task is not None:
            self._task.cancel()
            self._task.job.cleanup()
        self._task = None
        self.state = "cancelled"
        self._message = (f"Batch cancelled after {len(self.outputs)} of {len(self.inputs)} volumes; "
                         "the running conversion wrote nothing")

    def finish(self) -> list[Any]:
        """The output nodes made (also after a cancel: those finished before it)."""
        return list(self.outputs)

    def wait(self, timeout: float | None = None, progress: Callable[[float, str], None] | None = None,
             interval: float = 0.05) -> list[Any]:
        import time

        if self.state == "not started":
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == "running":
            if progress is not None:
                progress(self.progress, self.message)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                break
            time.sleep(interval)
        if progress is not None:
            progress(self.progress, self.message)
        return self.finish()


def start_batch_standardize(scene: Any, folder_item: int, model: Any = None, *, start: bool = True,
                            **options: Any) -> BatchStandardization:
    """Standardize every CT volume of a subject-hierarchy folder (see :func:`ct_volumes_in_folder`), one
    after another, each into a new node beside its input. ``options``: those of
    :func:`start_standardize_volume_node` (``device``, ``steps``, ``seed``, ...) and ``workdir_factory``."""
    nodes = ct_volumes_in_folder(scene, folder_item)
    if not nodes:
        raise InputError("the chosen folder holds no CT volume (label maps and LTDiffPP results are skipped)")
    batch = BatchStandardization(scene, nodes, model, **options)
    return batch.start() if start else batch


# ------------------------------------------------------------------------------------- sample data
def add_volume_from_file(scene: Any, path: str | os.PathLike, name: str, *, labelmap: bool = False) -> Any:
    """Read an image file into a new (label map) volume node named ``name``, through Slicer's own reader
    (a volume archetype storage node); the storage node is removed again (the node is not tied to a
    file in the cache)."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode",
                                   scene.GenerateUniqueName(name))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            raise InputError(f"{path}: could not be read as a volume")
    finally:
        scene.RemoveNode(storage)
    return node


def load_sample_files(scene: Any, files: Mapping[str, str | os.PathLike]) -> list[Any]:
    """Load the sample made by :mod:`LTDiffPPLib.sampledata` into the scene: one CT volume node per
    kernel (described) and a segmentation of the tissues (one named segment per tissue), all in a
    subject-hierarchy folder. Returns the nodes, CT volumes first."""
    import slicer

    from .sampledata import NODE_STEM, sample_files, tissue_names

    entries = {e.node_name: e for e in sample_files()}
    sh = subject_hierarchy(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), scene.GenerateUniqueName(f"{NODE_STEM} (LTDiffPP sample)"))
    nodes = []
    for name, path in files.items():
        entry = entries.get(name)
        if entry is None or entry.is_labelmap:
            continue
        node = add_volume_from_file(scene, path, name)
        node.SetDescription(entry.description)
        node.SetAttribute("LTDiffPP.kernel", entry.kernel)
        sh.SetItemParent(sh_item(scene, node), folder)
        nodes.append(node)
    for name, path in files.items():
        entry = entries.get(name)
        if entry is None or not entry.is_labelmap:
            continue
        labels = add_volume_from_file(scene, path, f"{name}_labels", labelmap=True)
        try:
            segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labels, segmentation):
                raise InputError(f"{path}: the tissue label map could not be converted to segments")
        finally:
            display = labels.GetDisplayNode()
            scene.RemoveNode(labels)
            if display is not None:
                scene.RemoveNode(display)
        _name_segments(segmentation, tissue_names())
        segmentation.SetDescription(entry.description)
        sh.SetItemParent(sh_item(scene, segmentation), folder)
        nodes.append(segmentation)
    return nodes


def _name_segments(segmentation_node: Any, names: Mapping[int, str]) -> None:
    """Name the segments imported from a label map after their label values."""
    seg = segmentation_node.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        value = segment.GetLabelValue() if hasattr(segment, "GetLabelValue") else None
        if value in names:
            segment.SetName(names[value])


# ---------------------------------------------------------------------------------------- segments
def segment_rois(scene: Any, segmentation_node: Any, reference_node: Any,
                 segment_ids: Sequence[str] | None = None) -> tuple[list[Roi], list[str]]:
    """One ROI per segment, on the voxel grid of ``reference_node`` (overlapping segments each keep all
    their voxels). Returns (ROIs named by segment, names of segments skipped because they hold no voxel
    inside the reference volume)."""
    import slicer
    import slicer.util
    import vtk

    from .radiomics import Roi

    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("expected a segmentation node")
    volume_from_node(reference_node)  # checks it is a usable scalar volume
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentIDs(ids)
        segment_ids = [ids.GetValue(i) for i in range(ids.GetNumberOfValues())]
    if not segment_ids:
        raise InputError(f"segmentation {segmentation_node.GetName()!r} has no segments")
    rois, skipped, used = [], [], set()
    existing_ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__LTDiffPP_temp_labelmap__")
    try:
        for index, segment_id in enumerate(segment_ids):
            segment = segmentation.GetSegment(segment_id)
            if segment is None:
                raise InputError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r}")
            one = vtk.vtkStringArray()
            one.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, one, labelmap, reference_node):
                raise InputError(f"segment {segment.GetName()!r} could not be converted to a label map")
            mask = np.asarray(slicer.util.arrayFromVolume(labelmap)) > 0
            name = segment.GetName() or segment_id
            if not mask.any():
                skipped.append(name)
                continue
            unique, k = name, 2
            while unique in used:
                unique, k = f"{name} ({k})", k + 1
            used.add(unique)
            zz, yy, xx = (np.nonzero(mask.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
            box = (slice(zz[0], zz[-1] + 1), slice(yy[0], yy[-1] + 1), slice(xx[0], xx[-1] + 1))
            rois.append(Roi(name=unique, start=tuple(int(b.start) for b in box), shape=mask[box].shape,
                            mask=mask[box].copy(), label=index + 1))
    finally:  # the export also made a display node and a color table for the temporary label map
        display = labelmap.GetDisplayNode()
        color = display.GetColorNode() if display is not None else None
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)
        if color is not None and color.GetID() not in existing_ids:
            scene.RemoveNode(color)
    return rois, skipped


# -------------------------------------------------------------------------------- tables and plots
def table_node_from_frame(scene: Any, frame: pd.DataFrame, name: str, *, index_column: str | None = None,
                          descriptions: Mapping[str, str] | None = None, node: Any | None = None) -> Any:
    """A ``vtkMRMLTableNode`` holding ``frame`` (its index first, as ``index_column``, when given):
    numeric columns as double arrays (NaN kept), everything else as strings."""
    import vtk

    frame = frame.reset_index(names=index_column) if index_column else frame
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    table = node.GetTable()
    table.Initialize()
    for column in frame.columns:
        values = frame[column]
        if values.dtype.kind in "iuf":
            array = vtk.vtkDoubleArray()
            array.SetNumberOfValues(len(values))
            for i, v in enumerate(values.to_numpy(np.float64)):
                array.SetValue(i, float(v))
        else:
            array = vtk.vtkStringArray()
            array.SetNumberOfValues(len(values))
            for i, v in enumerate(values):
                array.SetValue(i, "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        array.SetName(str(column))
        table.AddColumn(array)
    if hasattr(node, "SetUseColumnNameAsColumnHeader"):
        node.SetUseColumnNameAsColumnHeader(True)
    for column, text in (descriptions or {}).items():
        node.SetColumnDescription(column, text)
    node.Modified()
    return node


def frame_from_table_node(node: Any) -> pd.DataFrame:
    """A table node's columns as a DataFrame (double arrays as float, others as str)."""
    import pandas as pd

    table = node.GetTable()
    data = {}
    for c in range(table.GetNumberOfColumns()):
        array = table.GetColumn(c)
        n = array.GetNumberOfValues()
        if array.IsA("vtkDataArray"):
            data[array.GetName()] = np.array([array.GetValue(i) for i in range(n)], dtype=np.float64)
        else:
            data[array.GetName()] = [array.GetValue(i) for i in range(n)]
    return pd.DataFrame(data)


#: distinguishable bar colours (Okabe-Ito), one per method
_COLORS = ((0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.0, 0.620, 0.451), (0.8, 0.475, 0.655),
           (0.941, 0.894, 0.259), (0.337, 0.706, 0.914), (0.902, 0.624, 0.0), (0.3, 0.3, 0.3))


def ccc_bar_chart(scene: Any, ccc_table: Any, methods: Sequence[str], *, reference: str, name: str) -> Any:
    """A ``vtkMRMLPlotChartNode``: one bar series per method, one bar per class (mean CCC)."""
    import slicer

    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
    chart.SetTitle(f"Radiomic feature concordance with {reference} (Lin's CCC, mean per class)")
    chart.SetXAxisTitle("feature class")
    chart.SetYAxisTitle("mean CCC")
    chart.SetLegendVisibility(True)
    chart.SetYAxisRangeAuto(False)
    chart.SetYAxisRange(-0.1, 1.0)
    for k, method in enumerate(methods):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{method} CCC"))
        series.SetAndObserveTableNodeID(ccc_table.GetID())
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        series.SetXColumnName("class index")
        series.SetYColumnName(f"{method}: mean")
        series.SetLabelColumnName("class")
        series.SetColor(*_COLORS[k % len(_COLORS)])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


# ----------------------------------------------------------------------------------- radiomics + CCC
def feature_frame(features: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per feature (index: full name) with its image type and classes, then one column per
    (volume, segment): ``"<volume> | <segment>"``."""
    import pandas as pd

    from .radiomics import feature_table

    names = list(next(iter(features.values())).columns)
    classes = feature_table(names)
    out = pd.DataFrame({"image type": classes["image_type"], "class": classes["native_class"],
                        "paper class": classes["paper_class"].fillna(""), "feature": classes["feature"]},
                       index=pd.Index(names, name="name"))
    columns = {f"{volume} | {roi}": table.loc[roi, names].to_numpy(np.float64)
               for volume, table in features.items() for roi in table.index}
    return pd.concat([out, pd.DataFrame(columns, index=out.index)], axis=1)


def ccc_frame(features: Mapping[str, pd.DataFrame], reference: str, methods: Sequence[str], *,
              threshold: float = 0.85, min_pairs: int = 3) -> pd.DataFrame:
    """Lin's CCC of every feature across segments, each method against the reference, summarized per
    class: rows = the paper's classes, the native classes, 'all'; columns ``class``, ``class index``,
    ``grouping`` and per method ``<m>: mean``, ``<m>: std``, ``<m>: n``, ``<m>: fraction >= t``.
    Shape features (identical by design: the ROI is shared) are left out."""
    import pandas as pd

    from .concordance import ccc_per_feature
    from .evaluation import class_summary
    from .radiomics import feature_table

    ref = features[reference]
    classes = feature_table(list(ref.columns))
    in_ccc = classes.index[classes["in_ccc"]]
    per_method = {m: class_summary(ccc_per_feature(ref[in_ccc], features[m][in_ccc], min_pairs),
                                   classes.loc[in_ccc], threshold, image_types=False) for m in methods}
    first = next(iter(per_method.values()), None)
    rows = list(first.index) if first is not None else []
    out = pd.DataFrame({"class": rows, "class index": np.arange(len(rows), dtype=np.float64),
                        "grouping": list(first["grouping"]) if first is not None else []})
    for method, summary in per_method.items():
        out[f"{method}: mean"] = summary["mean"].to_numpy()
        out[f"{method}: std"] = summary["std"].to_numpy()
        out[f"{method}: n"] = summary["n"].to_numpy(np.float64)
        out[f"{method}: fraction >= {threshold:g}"] = summary["frac_ge"].to_numpy()
    return out


@dataclass
class RadiomicsCCCResult:
    """What :func:`compute_radiomics_ccc` added to the scene (all under one subject-hierarchy folder)."""

    feature_table: Any
    ccc_table: Any
    chart: Any
    folder_item: int
    features: dict[str, pd.DataFrame] = field(repr=False)
    ccc: pd.DataFrame = field(repr=False)
    skipped_segments: list[str]


def _unique_names(nodes: Sequence[Any]) -> list[str]:
    names, seen = [], set()
    for node in nodes:
        name = node.GetName() or node.GetID()
        if name in seen:
            name = f"{name} [{node.GetID()}]"
        seen.add(name)
        names.append(name)
    return names


class RadiomicsCCC(NodeTask):
    """Segment radiomics + CCC in a worker process; :meth:`finish` returns a :class:`RadiomicsCCCResult`."""

    def __init__(self, scene: Any, job: Job, *, segmentation_node: Any, reference_node: Any,
                 names: dict[str, Any], reference: str, methods: list[str], skipped: list[str],
                 threshold: float, min_pairs: int):
        super().__init__(job)
        self.scene, self.segmentation_node, self.reference_node = scene, segmentation_node, reference_node
        self.names, self.reference, self.methods, self.skipped = names, reference, methods, skipped
        self.threshold, self.min_pairs = threshold, min_pairs

    def _finish(self) -> RadiomicsCCCResult:
        from .runner import RadiomicsJob

        assert isinstance(self.job, RadiomicsJob)
        features = self.job.features()
        ccc = ccc_frame(features, self.reference, self.methods, threshold=self.threshold, min_pairs=self.min_pairs)
        scene, sh = self.scene, subject_hierarchy(self.scene)
        seg_name = self.segmentation_node.GetName()
        parent = sh.GetItemParent(sh_item(scene, self.reference_node)) or sh.GetSceneItemID()
        folder = sh.CreateFolderItem(parent, scene.GenerateUniqueName(f"LTDiffPP radiomics {seg_name}"))
        feature_node = table_node_from_frame(
            scene, feature_frame(features), f"{seg_name} radiomic features", index_column="name",
            descriptions={"name": "PyRadiomics/GOH feature name: <image type>_<class>_<feature>"})
        ccc_node = table_node_from_frame(
            scene, ccc, f"{seg_name} CCC per class",
            descriptions={f"{m}: mean": f"mean Lin's CCC of {m} vs {self.reference} across segments"
                          for m in self.methods})
        for node, role in ((feature_node, "features"), (ccc_node, "ccc")):
            node.SetAttribute("LTDiffPP.role", role)
            node.SetAttribute("LTDiffPP.reference", self.reference)
            node.SetAttribute("LTDiffPP.segmentation", self.segmentation_node.GetID())
        chart = ccc_bar_chart(scene, ccc_node, self.methods, reference=self.reference,
                              name=f"{seg_name} CCC per class")
        series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        for node in [feature_node, ccc_node, chart, *series]:
            sh.SetItemParent(sh_item(scene, node), folder)
        return RadiomicsCCCResult(feature_table=feature_node, ccc_table=ccc_node, chart=chart, folder_item=folder,
                                  features=features, ccc=ccc, skipped_segments=self.skipped)


def start_radiomics_ccc(scene: Any, segmentation_node: Any, volume_nodes: Sequence[Any], reference_node: Any, *,
                        params: str | None = None, image_types: Mapping[str, Mapping[str, Any]] | None = None,
                        mode: str | None = None, workers: int | None = None, python: str | None = None,
                        workdir: str | os.PathLike | None = None, start: bool = True) -> RadiomicsCCC:
    """Radiomic features of every segment on every volume and on the reference, then Lin's CCC of each
    volume against the reference across segments, per feature class; runs in a worker process.

    All volumes must share the reference's voxel grid (e.g. a source volume and its standardized
    output). ``params`` (parameter file), ``image_types`` (e.g. ``{"Original": {}}``) and ``mode``
    override the shipped radiomics settings. The result tables and chart land in one new
    subject-hierarchy folder beside the reference. ``workdir``: an empty folder for the temporary files,
    taken over and deleted at the end (default: the system temp).
    """
    from .radiomics import load_params
    from .runner import RadiomicsJob

    if reference_node is None:
        raise InputError("choose a reference volume (the real target-kernel image)")
    volume_nodes = [v for v in volume_nodes if v is not None and v.GetID() != reference_node.GetID()]
    if not volume_nodes:
        raise InputError("choose at least one volume to compare with the reference")
    all_nodes = [reference_node, *volume_nodes]
    for node in volume_nodes:
        volume_from_node(node)
        if not same_grid(node, reference_node):
            raise InputError(f"volume {node.GetName()!r} is not on the voxel grid of the reference "
                             f"{reference_node.GetName()!r}; resample it first (e.g. Resample Image (BRAINS))")
    loaded_params = load_params(params)
    min_pairs = int(loaded_params.concordance.get("min_pairs", 3))
    threshold = float(loaded_params.concordance.get("ccc_threshold", 0.85))
    rois, skipped = segment_rois(scene, segmentation_node, reference_node)
    if len(rois) < min_pairs:
        raise InputError(
            f"Lin's CCC across segments needs at least {min_pairs} non-empty segments inside the reference "
            f"volume; {segmentation_node.GetName()!r} has {len(rois)}"
            + (f" (empty there: {', '.join(skipped)})" if skipped else ""))
    names = _unique_names(all_nodes)
    volumes = {name: volume_from_node(node) for name, node in zip(names, all_nodes)}
    job = RadiomicsJob(volumes, rois, params=params, image_types=image_types, mode=mode, workers=workers,
                       python=python, workdir=workdir)
    task = RadiomicsCCC(scene, job, segmentation_node=segmentation_node, reference_node=reference_node,
                        names=dict(zip(names, all_nodes)), reference=names[0], methods=names[1:],
                        skipped=skipped, threshold=threshold, min_pairs=min_pairs)
    return task.start() if start else task
