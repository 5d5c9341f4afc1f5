"""Volume nodes on real MRML (the slicer-core package, no Slicer application, no mocks)."""

import threading

import numpy as np
import pytest

from LTDiffPPLib.errors import Cancelled, InputError
from LTDiffPPLib.inference import standardize
from LTDiffPPLib.io import CTVolume, read_image, write_image
from LTDiffPPLib.phantom import qa_phantom

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (it is in the [test] extras)")
import vtk  # noqa: E402  (comes with slicer-core)

from LTDiffPPLib.mrml import standardize_volume_node, update_node_from_volume, volume_from_node  # noqa: E402


def _oblique_direction() -> tuple[float, ...]:
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    return tuple(rot.ravel())


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def ct() -> CTVolume:
    return CTVolume(hu=qa_phantom((3, 32, 40), spacing_mm=6.0, seed=4), spacing=(0.7, 0.75, 2.5),
                    origin=(-10.0, 20.0, 30.0), direction=_oblique_direction())


def test_node_geometry_matches_slicers_own_reader(scene, ct, tmp_path):
    """Our LPS<->RAS conversion agrees with how Slicer itself loads the same NRRD file."""
    path = write_image(ct, tmp_path / "ct.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    got, ref = volume_from_node(node), read_image(path)
    np.testing.assert_allclose(got.spacing, ref.spacing, atol=1e-6)
    np.testing.assert_allclose(got.origin, ref.origin, atol=1e-5)
    np.testing.assert_allclose(got.direction, ref.direction, atol=1e-6)
    np.testing.assert_array_equal(got.hu, ref.hu)


def test_round_trip_through_a_node_and_slicers_writer(scene, ct, tmp_path):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    update_node_from_volume(node, ct)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(node)
    back = read_image(tmp_path / "saved.nrrd")
    np.testing.assert_allclose(back.origin, ct.origin, atol=1e-5)
    np.testing.assert_allclose(back.direction, ct.direction, atol=1e-6)
    np.testing.assert_array_equal(back.hu, ct.hu)


def test_standardize_volume_node_end_to_end(scene, ct, tiny_model):
    inp = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest")
    update_node_from_volume(inp, ct)
    tf = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    inp.SetAndObserveTransformNodeID(tf.GetID())
    before = slicer.util.arrayFromVolume(inp).copy()
    out = standardize_volume_node(scene, inp, model=tiny_model, steps=2, seed=1, device="cpu")
    assert out.GetName().startswith("chest_B70f") and "seed 1" in out.GetDescription()
    assert out.GetTransformNodeID() == tf.GetID()
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    inp.GetIJKToRASMatrix(a)
    out.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == pytest.approx(b.GetElement(r, c)) for r in range(4) for c in range(4))
    expected = standardize(ct.hu, ct.spacing, tiny_model, steps=2, seed=1, device="cpu")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out), expected)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inp), before)  # input untouched


def test_cancelled_run_adds_no_node(scene, ct, tiny_model):
    inp = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "chest")
    update_node_from_volume(inp, ct)
    n_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        standardize_volume_node(scene, inp, model=tiny_model, steps=2, cancel=ev, device="cpu")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_before


def test_labelmaps_and_empty_nodes_are_refused(scene):
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg")
    with pytest.raises(InputError, match="scalar"):
        volume_from_node(lab)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        volume_from_node(empty)
