"""The Slicer module's MRML logic on real MRML (the slicer-core package: real scene, nodes, subject
hierarchy, segmentations, tables and plots; no Slicer application, no mocks). Worker-process runs are
real subprocesses with a tiny untrained model."""

import threading
import time

import numpy as np
import pytest
from conftest import requires_torch

from LTDiffPPLib.errors import Cancelled, InputError
from LTDiffPPLib.io import CTVolume, read_image, write_image
from LTDiffPPLib.phantom import qa_phantom

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (it is in the [test] extras)")
import vtk  # noqa: E402  (comes with slicer-core)

from LTDiffPPLib.mrml import (  # noqa: E402
    ccc_frame,
    frame_from_table_node,
    headless_scene,
    same_grid,
    segment_rois,
    sh_item,
    standardize_volume_node,
    start_radiomics_ccc,
    start_standardize_volume_node,
    subject_hierarchy,
    table_node_from_frame,
    update_node_from_volume,
    volume_from_node,
)
from LTDiffPPLib.runner import CANCELLED, JobError  # noqa: E402


def _standardize(*args, **kwargs):
    """``LTDiffPPLib.inference.standardize``, imported on use: it needs torch, which the Python 3.12
    GUI-side run of these tests does not have (the tests that call it skip there)."""
    from LTDiffPPLib.inference import standardize

    return standardize(*args, **kwargs)


def _oblique_direction() -> tuple[float, ...]:
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    return tuple(rot.ravel())


@pytest.fixture
def scene():
    """A headless scene with the logics of colors, subject hierarchy, segmentations, tables, plots."""
    return headless_scene()


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
    expected = _standardize(ct.hu, ct.spacing, tiny_model, steps=2, seed=1, device="cpu")
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


# ------------------------------------------------------------------------------------------- helpers
def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _volume_node(scene, volume: CTVolume, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    update_node_from_volume(node, volume)
    return node


def _in_study(scene, node, study_name="Patient 1"):
    """Put ``node`` into a study folder, as loading DICOM does."""
    sh = subject_hierarchy(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), study_name)
    sh.SetItemParent(sh_item(scene, node), study)
    return study


def _segmentation_from_labels(scene, labels: np.ndarray, like: CTVolume, name="organs"):
    """A real segmentation node, imported from a label map on ``like``'s grid (one segment per label)."""
    lab = _volume_node_labelmap(scene, labels, like)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    scene.RemoveNode(lab)
    return seg


def _volume_node_labelmap(scene, labels: np.ndarray, like: CTVolume):
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    update_node_from_volume(lab, like.with_hu(labels))  # geometry
    slicer.util.updateVolumeFromArray(lab, np.asarray(labels, np.int16))  # integer voxels
    return lab


def _four_segments(shape) -> np.ndarray:
    labels = np.zeros(shape, np.int16)
    labels[:, 2:14, 2:14] = 1
    labels[:, 20:34, 4:16] = 2
    labels[:, 30:46, 30:46] = 3
    labels[1, 5:20, 25:40] = 4
    return labels


# ------------------------------------------------------------------------------------------- scene
def test_headless_scene_has_the_module_logics(scene):
    assert subject_hierarchy(scene) is not None
    assert scene.GetFirstNodeByClass("vtkMRMLColorTableNode") is not None  # colors logic ran
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    assert sh_item(scene, vol) == sh_item(scene, vol) != 0  # created once, then found


# -------------------------------------------------------------------------- standardization (in-process)
def test_in_process_run_fills_a_given_output_node_beside_the_input(scene, ct, tiny_model):
    inp = _volume_node(scene, ct, "chest")
    study = _in_study(scene, inp)
    out = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    got = standardize_volume_node(scene, inp, out, model=tiny_model, steps=2, seed=3, device="cpu")
    assert got is out and out.GetName() == "mine"
    assert subject_hierarchy(scene).GetItemParent(sh_item(scene, out)) == study
    np.testing.assert_allclose(_ijk_to_ras(out), _ijk_to_ras(inp), atol=1e-9)
    assert out.GetAttribute("LTDiffPP.target_kernel") == "B70f" and out.GetAttribute("LTDiffPP.seed") == "3"
    with pytest.raises(InputError, match="differ from the input"):
        standardize_volume_node(scene, inp, inp, model=tiny_model, steps=2, device="cpu")


# ----------------------------------------------------------------------- standardization (worker process)
def test_worker_run_end_to_end_new_node_beside_input(scene, ct, tiny_model, tiny_model_path):
    """The path the Slicer module takes: a real worker subprocess, polled; result identical to the
    in-process conversion, geometry preserved to the voxel, placed and described."""
    inp = _volume_node(scene, ct, "chest")
    tf = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    inp.SetAndObserveTransformNodeID(tf.GetID())
    study = _in_study(scene, inp)
    before = slicer.util.arrayFromVolume(inp).copy()
    n_volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    task = start_standardize_volume_node(scene, inp, model=str(tiny_model_path), source_kernel="B30f", steps=2, seed=1, device="cpu")
    seen = []
    while task.poll() == "running":  # what the widget's QTimer does
        seen.append(task.progress)
        assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n_volumes  # nothing before the end
        time.sleep(0.05)
    out = task.finish()
    assert task.state == "done" and task.progress == 1.0 and seen == sorted(seen)
    assert out.GetName() == "chest_B70f"
    for text in ("B30f -> B70f", "tiny-test", "2 steps", "seed 1"):
        assert text in out.GetDescription()
    assert out.GetTransformNodeID() == tf.GetID()
    np.testing.assert_allclose(_ijk_to_ras(out), _ijk_to_ras(inp), atol=1e-9)
    assert same_grid(out, inp)
    expected = _standardize(ct.hu, ct.spacing, tiny_model, steps=2, seed=1, device="cpu")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out), expected)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(inp), before)
    sh = subject_hierarchy(scene)
    assert sh.GetItemParent(sh_item(scene, out)) == study
    assert sh.GetItemAttribute(sh_item(scene, out), "LTDiffPP.description") == out.GetDescription()
    assert not task.job.workdir.exists()  # temporary NRRD files removed


def test_cancelled_worker_run_leaves_the_output_untouched(scene, tiny_model_path):
    big = CTVolume(hu=qa_phantom((24, 64, 64), spacing_mm=3.0, seed=1), spacing=(0.7, 0.7, 2.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    inp = _volume_node(scene, big, "chest")
    out = _volume_node(scene, big.with_hu(np.full(big.hu.shape, 7.0, np.float32)), "previous result")
    n_nodes = scene.GetNumberOfNodes()
    task = start_standardize_volume_node(scene, inp, out, model=str(tiny_model_path), source_kernel="B30f", steps=50, device="cpu")
    deadline = time.monotonic() + 120
    while task.poll() == "running" and task.progress == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert task.state == "running", task.job.error
    task.cancel()
    assert task.state == CANCELLED and task.job._proc.poll() is not None
    with pytest.raises(JobError, match="cancelled") as info:
        task.finish()
    assert info.value.kind == "Cancelled"
    assert scene.GetNumberOfNodes() == n_nodes
    assert (slicer.util.arrayFromVolume(out) == 7.0).all()  # not half-filled
    assert not task.job.workdir.exists()


@requires_torch
def test_failed_worker_run_says_why_and_adds_no_node(scene, ct, tmp_path):
    inp = _volume_node(scene, ct, "chest")
    bogus = tmp_path / "not-a-model.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    n_nodes = scene.GetNumberOfNodes()
    task = start_standardize_volume_node(scene, inp, model=str(bogus), source_kernel="B30f", steps=2, device="cpu")
    with pytest.raises(JobError, match="not-a-model.safetensors") as info:
        task.wait(timeout=120)
    assert info.value.kind == "ModelFileError"
    assert scene.GetNumberOfNodes() == n_nodes
    with pytest.raises(InputError, match=">= 1"):
        start_standardize_volume_node(scene, inp, model=str(bogus), source_kernel="B30f", steps=0)


# ----------------------------------------------------------------------------------------- segments
def test_segments_become_rois_on_the_reference_grid(scene, ct):
    ref_vol = CTVolume(hu=qa_phantom((3, 48, 48), spacing_mm=4.0, seed=2), spacing=(0.7, 0.75, 2.5),
                       origin=(-10.0, 20.0, 30.0), direction=_oblique_direction())
    ref = _volume_node(scene, ref_vol, "ref")
    labels = _four_segments(ref_vol.hu.shape)
    seg = _segmentation_from_labels(scene, labels, ref_vol)
    # an overlapping segment (a second import adds segments) and one outside the reference volume
    overlap = np.zeros_like(labels)
    overlap[:, 8:24, 8:24] = 1
    lab = _volume_node_labelmap(scene, overlap, ref_vol)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    far = _volume_node_labelmap(scene, np.ones((2, 4, 4)), CTVolume(
        hu=np.zeros((2, 4, 4)), spacing=(1, 1, 1), origin=(500.0, 500.0, 500.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(far, seg)
    n_before = scene.GetNumberOfNodes()
    rois, skipped = segment_rois(scene, seg, ref)
    assert scene.GetNumberOfNodes() == n_before  # the temporary label map is removed
    assert len(rois) == 5 and len(skipped) == 1
    expected = [labels == v for v in (1, 2, 3, 4)] + [overlap == 1]
    for roi, mask in zip(rois, expected):
        full = np.zeros(labels.shape, bool)
        full[roi.slices] = roi.box_mask()
        np.testing.assert_array_equal(full, mask)
    assert len({r.name for r in rois}) == 5


# --------------------------------------------------------------------------------------- tables
def test_table_node_round_trip(scene):
    import pandas as pd

    frame = pd.DataFrame({"class": ["GLCM", "all"], "n": [3, 4], "mean": [0.5, np.nan], "note": [None, "x"]})
    node = table_node_from_frame(scene, frame, "t")
    back = frame_from_table_node(node)
    assert list(back.columns) == ["class", "n", "mean", "note"]
    assert back["class"].tolist() == ["GLCM", "all"] and back["note"].tolist() == ["", "x"]
    np.testing.assert_array_equal(back["n"], [3.0, 4.0])
    assert back["mean"][0] == 0.5 and np.isnan(back["mean"][1])


def test_ccc_frame_identical_images_concord_perfectly():
    import pandas as pd

    rng = np.random.default_rng(0)
    names = ["original_glcm_Contrast", "original_firstorder_Mean", "original_firstorder_Entropy",
             "original_shape2D_Elongation"]
    ref = pd.DataFrame(rng.normal(size=(5, 4)), columns=names, index=[f"s{i}" for i in range(5)])
    ccc = ccc_frame({"ref": ref, "same": ref.copy(), "shifted": ref + 10.0}, "ref", ["same", "shifted"])
    row = ccc.set_index("class")
    assert row.loc["all", "same: mean"] == pytest.approx(1.0) and row.loc["all", "same: n"] == 3  # shape left out
    assert row.loc["all", "shifted: mean"] < 0.1
    assert {"GLCM", "ID", "IH", "glcm", "firstorder", "all"} <= set(row.index)


# ------------------------------------------------------------------------------------ radiomics + CCC
def test_radiomics_ccc_on_a_real_segmentation(scene):
    """Segment features of three volumes in a worker process, CCC tables, chart, one SH folder."""
    vol = CTVolume(hu=qa_phantom((3, 48, 48), spacing_mm=4.0, seed=4), spacing=(0.7, 0.75, 2.5),
                   origin=(-10.0, 20.0, 30.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    ref = _volume_node(scene, vol, "reference B70f")
    study = _in_study(scene, ref)
    rng = np.random.default_rng(0)
    noisy = _volume_node(scene, vol.with_hu(vol.hu + rng.normal(0, 40, vol.hu.shape)), "noisy")
    copy = _volume_node(scene, vol, "copy")
    labels = _four_segments(vol.hu.shape)
    seg = _segmentation_from_labels(scene, labels, vol)
    task = start_radiomics_ccc(scene, seg, [noisy, copy, ref], ref, image_types={"Original": {}}, workers=1)
    fractions = []
    result = task.wait(timeout=300, progress=lambda f, m: fractions.append(f))
    assert fractions[-1] == 1.0 and fractions == sorted(fractions)

    features = frame_from_table_node(result.feature_table)
    ref_mean = features.set_index("name").loc["original_firstorder_Mean"]
    for value in (1, 2, 3, 4):  # an independent oracle: the mean HU of each segment's voxels
        name = seg.GetSegmentation().GetNthSegment(value - 1).GetName()
        assert ref_mean[f"reference B70f | {name}"] == pytest.approx(vol.hu[labels == value].mean(), rel=1e-5)
    assert {"name", "image type", "class", "paper class"} <= set(features.columns)

    ccc = frame_from_table_node(result.ccc_table).set_index("class")
    assert ccc.loc["all", "copy: mean"] == pytest.approx(1.0)
    assert ccc.loc["all", "noisy: mean"] < 0.99
    assert list(ccc.index[:6]) == ["GOH", "GLCM", "GLRLM", "ID", "IH", "NID"]

    chart = result.chart
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 2
    for i, method in enumerate(["noisy", "copy"]):
        series = chart.GetNthPlotSeriesNode(i)
        assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeBar
        assert series.GetTableNode() is result.ccc_table
        assert series.GetYColumnName() == f"{method}: mean" and series.GetLabelColumnName() == "class"
    sh = subject_hierarchy(scene)
    folder = result.folder_item
    assert sh.GetItemParent(folder) == study
    for node in (result.feature_table, result.ccc_table, chart, chart.GetNthPlotSeriesNode(0)):
        assert sh.GetItemParent(sh_item(scene, node)) == folder
    assert not task.job.workdir.exists()


def test_radiomics_ccc_refuses_what_it_cannot_measure(scene):
    vol = CTVolume(hu=qa_phantom((3, 48, 48), spacing_mm=4.0, seed=4), spacing=(0.7, 0.75, 2.5),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    ref = _volume_node(scene, vol, "ref")
    labels = _four_segments(vol.hu.shape)
    two = _segmentation_from_labels(scene, np.where(labels <= 2, labels, 0), vol, "two")
    other = _volume_node(scene, vol, "shifted")
    other.SetOrigin(5.0, 0.0, 0.0)
    same = _volume_node(scene, vol, "same grid")
    four = _segmentation_from_labels(scene, labels, vol, "four")
    n_nodes = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="at least 3 non-empty segments"):
        start_radiomics_ccc(scene, two, [same], ref)
    with pytest.raises(InputError, match="not on the voxel grid"):
        start_radiomics_ccc(scene, four, [other], ref)
    with pytest.raises(InputError, match="at least one volume"):
        start_radiomics_ccc(scene, four, [ref], ref)
    assert scene.GetNumberOfNodes() == n_nodes  # refused before anything was added


# ------------------------------------------------------------------------------------ output rule
def test_a_new_output_node_per_input_unless_chosen(scene, ct, tiny_model_path):
    """The selector may still show the last result: Apply on ANOTHER input must not overwrite it; a
    re-run of the same input, or a volume the user chose, is filled."""
    from LTDiffPPLib.mrml import resolve_output_node

    a = _volume_node(scene, ct, "chestA")
    b = _volume_node(scene, ct.with_hu(ct.hu[::-1].copy()), "chestB")
    out_a = start_standardize_volume_node(scene, a, model=str(tiny_model_path), source_kernel="B30f", steps=1, device="cpu").wait(timeout=300)
    before = slicer.util.arrayFromVolume(out_a).copy()
    out_b = start_standardize_volume_node(scene, b, out_a, model=str(tiny_model_path), source_kernel="B30f", steps=1,
                                          device="cpu").wait(timeout=300)
    assert out_b is not out_a and out_b.GetName() == "chestB_B70f"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out_a), before)  # A's result untouched
    assert out_b.GetAttribute("LTDiffPP.source_volume") == b.GetID()
    again = start_standardize_volume_node(scene, a, out_a, model=str(tiny_model_path), source_kernel="B30f", steps=1, seed=5,
                                          device="cpu").wait(timeout=300)
    assert again is out_a and "seed 5" in out_a.GetDescription()  # the same input's result is refreshed
    mine = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my volume")
    assert resolve_output_node(b, mine) is mine  # a volume the user chose is used
    assert resolve_output_node(b, out_a) is None and resolve_output_node(a, out_a) is out_a


# ------------------------------------------------------------------------------------------- batch
def _study_with_volumes(scene, ct):
    """A patient/study as DICOM import makes it: two CTs, an MR, a label map, an earlier LTDiffPP result."""
    sh = subject_hierarchy(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    cts = [_volume_node(scene, ct, "CT1"), _volume_node(scene, ct.with_hu(ct.hu + 10.0), "CT2")]
    mr = _volume_node(scene, ct, "MR")
    lab = _volume_node_labelmap(scene, np.ones(ct.hu.shape), ct)
    old = _volume_node(scene, ct, "CT1_B70f (earlier)")
    old.SetAttribute("LTDiffPP.source_volume", cts[0].GetID())
    for node in [*cts, mr, lab, old]:
        sh.SetItemParent(sh_item(scene, node), study)
    sh.SetItemAttribute(sh_item(scene, mr), "DICOM.Modality", "MR")
    sh.SetItemAttribute(sh_item(scene, cts[0]), "DICOM.Modality", "CT")
    outside = _volume_node(scene, ct, "elsewhere")  # not in the folder
    return patient, study, cts, outside


def test_apply_to_all_converts_the_ct_volumes_of_a_folder(scene, ct, tiny_model, tiny_model_path):
    from LTDiffPPLib.mrml import ct_volumes_in_folder, start_batch_standardize

    patient, study, cts, outside = _study_with_volumes(scene, ct)
    assert ct_volumes_in_folder(scene, patient) == cts  # all levels below; MR, label map, result skipped
    batch = start_batch_standardize(scene, patient, str(tiny_model_path), source_kernel="B30f", steps=1, seed=2, device="cpu")
    seen = []
    while batch.poll() == "running":  # what the widget's QTimer does: one progress bar for the batch
        seen.append((batch.progress, batch.message))
        time.sleep(0.05)
    outputs = batch.finish()
    assert batch.state == "done" and batch.progress == 1.0 and not batch.failures
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and any(0.5 <= f < 1 for f in fractions)  # one bar over both volumes
    assert any(m.startswith("Volume 1 of 2 (CT1)") for _, m in seen)
    assert any(m.startswith("Volume 2 of 2 (CT2)") for _, m in seen)
    assert [o.GetName() for o in outputs] == ["CT1_B70f", "CT2_B70f"]
    sh = subject_hierarchy(scene)
    for node, out in zip(cts, outputs):
        assert sh.GetItemParent(sh_item(scene, out)) == study
        expected = _standardize(volume_from_node(node).hu, ct.spacing, tiny_model, steps=1, seed=2, device="cpu")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(out), expected)
    assert "2 of 2 volumes" in batch.message
    with pytest.raises(InputError, match="no CT volume"):
        start_batch_standardize(scene, sh.CreateFolderItem(sh.GetSceneItemID(), "empty"), str(tiny_model_path))


def test_apply_to_all_goes_on_past_a_bad_volume_and_cancel_stops_it(scene, tiny_model_path):
    from LTDiffPPLib.mrml import BatchStandardization

    big = CTVolume(hu=qa_phantom((16, 64, 64), spacing_mm=3.0, seed=1), spacing=(0.7, 0.7, 2.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no voxels")
    first, second = _volume_node(scene, big, "big1"), _volume_node(scene, big, "big2")
    n_nodes = scene.GetNumberOfNodes()
    batch = BatchStandardization(scene, [empty, first, second], str(tiny_model_path), source_kernel="B30f", steps=50, device="cpu").start()
    assert "no voxels" in batch.failures and "no image data" in batch.failures["no voxels"]
    deadline = time.monotonic() + 120
    while batch.poll() == "running" and batch.progress <= 1 / 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batch.state == "running" and batch.index == 1  # the bad one skipped, the first big one running
    worker = batch._task.job
    batch.cancel()
    assert batch.state == "cancelled" and worker._proc.poll() is not None
    assert batch.finish() == [] and scene.GetNumberOfNodes() == n_nodes  # the running one wrote nothing
    assert "cancelled" in batch.message and not worker.workdir.exists()


# ------------------------------------------------------------------------------------- status text
def test_status_text_lists_the_workers_warnings(scene, tiny_model_path):
    from LTDiffPPLib.mrml import status_text

    coarse = CTVolume(hu=qa_phantom((1, 32, 32), spacing_mm=6.0, seed=2), spacing=(2.0, 2.0, 2.5),
                      origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    node = _volume_node(scene, coarse, "coarse")
    task = start_standardize_volume_node(scene, node, model=str(tiny_model_path), source_kernel="B30f", steps=1, device="cpu")
    task.wait(timeout=300)
    assert task.warnings and "in-plane pixels 2 x 2 mm resampled to 1 mm" in task.warnings[0]
    text = status_text(task)
    assert text.startswith("Done: 1 slices") and f"Warning: {task.warnings[0]}" in text


# ------------------------------------------------------------------------------------- sample data
def test_sample_data_loads_as_ct_volumes_and_tissue_segments(scene, tmp_path):
    from LTDiffPPLib.mrml import load_sample_files
    from LTDiffPPLib.sampledata import generate_sample

    files = generate_sample(tmp_path, shape=(2, 64, 64), workers=1)
    nodes = load_sample_files(scene, files)
    volumes, segmentation = nodes[:-1], nodes[-1]
    assert [v.GetName() for v in volumes] == ["ChestPhantom_B30f", "ChestPhantom_B70f", "ChestPhantom_B50f"]
    for v in volumes:
        ref = read_image(files[v.GetName()])
        got = volume_from_node(v)
        np.testing.assert_array_equal(got.hu, ref.hu)
        np.testing.assert_allclose(got.origin, ref.origin, atol=1e-5)
        assert v.GetAttribute("LTDiffPP.kernel") in v.GetName() and "reconstructed with" in v.GetDescription()
    assert segmentation.IsA("vtkMRMLSegmentationNode")
    names = {segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())}
    assert {"lung", "bone", "fat"} <= names
    sh = subject_hierarchy(scene)
    folders = {sh.GetItemParent(sh_item(scene, n)) for n in nodes}
    assert len(folders) == 1 and "ChestPhantom" in sh.GetItemName(folders.pop())
    assert scene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode") is None  # the temporary label map is gone


# ------------------------------------------------------------------------------------- kernel preview
def test_kernel_preview_says_what_apply_would_do(scene, tiny_model_path):
    """The panel's line before Apply: the source kernel and how it was found, or why it would be refused
    (the worker's own domain guard, run in the application's process)."""
    from LTDiffPPLib.mrml import kernel_preview, node_dicom_kernel

    hu = np.full((2, 64, 64), -1000.0, np.float32)
    hu[:, 8:-8, 8:-8] = np.random.default_rng(0).normal(40, 20, (2, 48, 48))
    node = _volume_node(scene, CTVolume(hu=hu, spacing=(0.7, 0.7, 2.0), origin=(0.0, 0.0, 0.0),
                                        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0)), "CT")
    assert node_dicom_kernel(node) is None
    assert kernel_preview(node).startswith("Apply would refuse this volume: CT: source kernel unknown")
    assert kernel_preview(node, source_kernel="B30f").startswith("B30f \u2192 B70f: source kernel B30f (given); "
                                                                 "model ltdiffpp-b30f-b70f")

    class Database:  # Slicer's DICOM database, as the module's logic passes it (the only stand-in here)
        def instanceValue(self, uid, tag):
            return {"0008,0070": "SIEMENS", "0018,1210": "B50f"}[tag] if uid == "1.2.3" else ""

    node.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    assert node_dicom_kernel(node, Database()) == ("SIEMENS", "B50f")
    assert kernel_preview(node, "B50f", dicom_database=Database()).startswith("Nothing to convert: CT is already B50f")
    # a pair without a per-pair model: the kernel-conditioned model converts it, and the preview says so
    assert "model ltdiffpp-kernel-conditioned" in kernel_preview(node, dicom_database=Database())
    node.SetAttribute("DICOM.Manufacturer", "Philips")
    node.SetAttribute("DICOM.ConvolutionKernel", "C")  # node attributes come first
    assert "Philips-C (DICOM header: Philips C) has no known frequency response" in kernel_preview(node)
    big = _volume_node(scene, CTVolume(hu=np.repeat(hu, 1, axis=0), spacing=(1.6, 1.6, 2.0), origin=(0.0, 0.0, 0.0),
                                       direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0)), "coarse")
    assert "resampled to 1 mm" in kernel_preview(big, source_kernel="B30f", model=str(tiny_model_path))
