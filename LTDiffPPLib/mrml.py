"""MRML volume nodes ↔ :class:`~LTDiffPPLib.io.CTVolume`, and standardization of a volume node.

Qt-free: works in the Slicer application and, for tests and servers, on the ``slicer-core`` package.
The scene is always passed explicitly (no ``slicer.mrmlScene``). Slicer stores geometry in RAS, the
library (like DICOM and ITK) in LPS: the two differ by a sign flip of x and y.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .errors import InputError
from .inference import ProgressCallback, standardize
from .io import CTVolume
from .modelfile import LoadedModel, load_model

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
    """Standardize ``input_node`` into ``output_node`` (a new node in ``scene`` when None); returns it.

    The output keeps the input's geometry and parent transform; its name and description say model,
    kernels, steps and seed. Nothing is created or changed unless the whole volume was converted: a
    failure or cancel leaves the scene as it was.
    """
    volume = volume_from_node(input_node)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    meta = loaded.metadata
    steps = int(meta["sampling"]["steps"] if steps is None else steps)
    hu = standardize(volume.hu, volume.spacing, loaded, device=device, steps=steps, seed=seed,
                     batch_size=batch_size, progress=progress, cancel=cancel)
    if output_node is None:
        name = scene.GenerateUniqueName(f"{input_node.GetName()}_{meta['target_kernel']}")
        output_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_node_from_volume(output_node, volume.with_hu(hu))
    output_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    description = (f"LTDiffPP {meta['source_kernel']} -> {meta['target_kernel']}; model {meta.get('name', '')} "
                   f"(sha256 {loaded.sha256[:12]}); {meta['sampling']['solver']} {steps} steps; seed {seed}")
    output_node.SetDescription(description)
    output_node.SetAttribute("LTDiffPP.model_sha256", loaded.sha256)
    output_node.SetAttribute("LTDiffPP.source_volume", input_node.GetID())
    return output_node
