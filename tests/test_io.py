"""Tests of LTDiffPPLib.io: DICOM/image reading and writing, geometry against SimpleITK, atomic output."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LTDiffPPLib import io
from LTDiffPPLib.errors import InputError, OutputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHEST = DATA / "chest_ct"


def _shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data {path} not found (expected ../shared/data beside the repository)")
    return path


@pytest.fixture(scope="module")
def philips() -> Path:
    return _shared(CHEST / "itkelastix_philips_C")


@pytest.fixture(scope="module")
def siemens() -> Path:
    return _shared(CHEST / "totalsegmentator_siemens_Br38f")


@pytest.fixture(scope="module")
def ge() -> Path:
    return _shared(CHEST / "dcmqi_ge_standard")


@pytest.fixture(scope="module")
def philips_volume(philips: Path) -> io.CTVolume:
    return io.read_dicom_series(philips)


def _copy(files, folder: Path, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        shutil.copy(f, folder / (names[i] if names else f.name))
    return folder


def _philips_files_in_order(philips: Path) -> list[Path]:
    """Philips files ordered by position along the slice normal (computed here, independently)."""
    files = sorted(philips.iterdir())
    keys = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    return [f for _, f in sorted(zip(keys, files))]


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _assert_same_as_sitk(volume: io.CTVolume, image: sitk.Image) -> None:
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, image.GetDirection(), atol=1e-4)
    expected = sitk.GetArrayFromImage(image).astype(np.float32)
    if volume.padding is not None:  # SimpleITK does not apply PixelPaddingValue: padding reads as air here
        assert np.all(volume.hu[volume.padding] == -1024.0)
        assert len(np.unique(expected[volume.padding])) == 1  # one stored padding value (GE: -2000 -> -3024 HU)
        expected[volume.padding] = -1024.0
    np.testing.assert_array_equal(volume.hu, expected)


def _edit_copies(src: Path, dst: Path, edit) -> Path:
    """Copy every file of ``src`` to ``dst``, applying ``edit(ds, index)`` to each dataset."""
    dst.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(f)
        edit(ds, i)
        ds.save_as(dst / f.name)
    return dst


@pytest.fixture
def synthetic() -> io.CTVolume:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1024, 2000, size=(6, 9, 11)).astype(np.float32)
    return io.CTVolume(hu=hu, spacing=(0.7, 0.8, 2.5), origin=(-120.5, 33.25, -401.0),
                       direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), source="synthetic")


def _sha256_tree(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------------ reading DICOM
def test_real_series_matches_simpleitk(philips, philips_volume):
    v = philips_volume
    assert v.hu.shape == (141, 512, 512) and v.hu.dtype == np.float32
    np.testing.assert_allclose(v.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    _assert_same_as_sitk(v, _sitk_series(philips))
    assert v.dicom_header is not None and "PixelData" not in v.dicom_header
    assert str(v.dicom_header.Modality) == "CT" and v.source == str(philips)


def test_compressed_series_matches_simpleitk(siemens):
    """The Siemens series is JPEG 2000: decoded through SimpleITK's GDCM when pydicom has no decoder."""
    v = io.read_dicom_series(siemens)
    assert v.hu.shape == (20, 512, 512)
    _assert_same_as_sitk(v, _sitk_series(siemens))


def test_hu_is_stored_value_times_slope_plus_intercept(philips, philips_volume):
    ordered = _philips_files_in_order(philips)
    k, y, x = 70, 256, 300
    ds = pydicom.dcmread(ordered[k])
    expected = float(ds.pixel_array[y, x]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert philips_volume.hu[k, y, x] == expected
    first_position = pydicom.dcmread(ordered[0], stop_before_pixels=True).ImagePositionPatient
    np.testing.assert_allclose(philips_volume.origin, [float(v) for v in first_position])


def test_slice_order_does_not_depend_on_file_names(tmp_path, philips, philips_volume):
    files = _philips_files_in_order(philips)[30:46]
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    folder = _copy(shuffled, tmp_path / "shuffled", names=[f"x{i:03d}" for i in range(len(files))])
    v = io.read_volume(folder)
    np.testing.assert_array_equal(v.hu, philips_volume.hu[30:46])
    np.testing.assert_allclose(v.origin, np.array(philips_volume.origin) + [0, 0, 30 * 2.0], atol=1e-6)
    assert v.spacing == philips_volume.spacing and v.direction == philips_volume.direction


def test_several_series_need_a_uid(tmp_path, philips, siemens):
    folder = _copy(sorted(siemens.iterdir()), tmp_path / "mixed")
    _copy(_philips_files_in_order(philips)[:20], folder)
    philips_uid = str(pydicom.dcmread(next(philips.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    infos = io.list_dicom_series(folder)
    assert sorted(i.kernel for i in infos) == ["Br38f\\3", "C"] and all(i.n_files == 20 for i in infos)
    with pytest.raises(InputError) as err:
        io.read_volume(folder)
    msg = str(err.value)
    assert str(folder) in msg and philips_uid in msg and "Br38f" in msg and "series" in msg.lower()
    assert io.read_volume(folder, series_uid=philips_uid).dicom_header.ConvolutionKernel == "C"
    siemens_uid = next(i.series_uid for i in infos if i.kernel.startswith("Br38f"))
    assert io.read_dicom_series(folder, siemens_uid).hu.shape == (20, 512, 512)
    with pytest.raises(InputError, match="no series with UID 1.2.3") as err:
        io.read_dicom_series(folder, "1.2.3")
    assert philips_uid in str(err.value)


def test_folder_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    (empty / ".hidden").write_bytes(b"\0" * 200)
    with pytest.raises(InputError, match="No DICOM") as err:
        io.read_volume(empty)
    assert str(empty) in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        io.read_dicom_series(tmp_path / "missing")


def test_other_files_are_skipped(tmp_path, ge):
    folder = _copy(sorted(ge.iterdir()), tmp_path / "ge")
    (folder / "README.txt").write_text("hello")
    (folder / "DICOMDIR").write_bytes(b"junk")
    shutil.copy(next(ge.iterdir()), folder / ".hidden.dcm")
    v = io.read_volume(folder)
    assert v.hu.shape == (3, 512, 512)
    _assert_same_as_sitk(v, _sitk_series(ge))


def test_single_file_and_single_slice(tmp_path, ge):
    first = sorted(ge.iterdir())[0]
    with pytest.raises(InputError, match="folder"):
        io.read_volume(first)
    v = io.read_volume(_copy([first], tmp_path / "one"))
    assert v.hu.shape == (1, 512, 512) and v.spacing[2] == pytest.approx(1.25)


def test_non_ct_modality_and_missing_modality(tmp_path, ge):
    def to_mr(ds, i):
        ds.Modality = "MR"

    with pytest.raises(InputError, match="MR"):
        io.read_volume(_edit_copies(ge, tmp_path / "mr", to_mr))

    def drop(ds, i):
        del ds.Modality

    with pytest.warns(UserWarning, match="Modality"):
        assert io.read_volume(_edit_copies(ge, tmp_path / "nomod", drop)).hu.shape[0] == 3


def test_missing_rescale_warns(tmp_path, ge):
    def drop(ds, i):
        del ds.RescaleSlope, ds.RescaleIntercept

    with pytest.warns(UserWarning, match="Rescale"):
        v = io.read_volume(_edit_copies(ge, tmp_path / "norescale", drop))
    base = io.read_volume(ge)
    assert v.padding is not None and np.array_equal(v.padding, base.padding)  # PixelPaddingValue: air in both
    np.testing.assert_array_equal(v.hu[~v.padding], base.hu[~v.padding] + 1024)
    assert np.all(v.hu[v.padding] == -1024) and np.all(base.hu[base.padding] == -1024)


def test_duplicate_slice(tmp_path, ge):
    folder = _copy(sorted(ge.iterdir()), tmp_path / "dup")
    shutil.copy(folder / "02.dcm", folder / "02b.dcm")
    with pytest.raises(InputError, match="same slice position") as err:
        io.read_volume(folder)
    assert "02.dcm" in str(err.value) and "02b.dcm" in str(err.value)


def test_gap_in_series(tmp_path, philips):
    files = _philips_files_in_order(philips)[:10]
    folder = _copy(files[:5] + files[6:], tmp_path / "gap")
    with pytest.raises(InputError, match="Irregular slice spacing") as err:
        io.read_volume(folder)
    assert files[4].name in str(err.value) and files[6].name in str(err.value)


@pytest.mark.parametrize("problem", ["no_position", "orientation", "tilt", "no_pixels", "rgb"])
def test_broken_geometry_or_pixels(tmp_path, ge, problem):
    def edit(ds, i):
        if problem == "no_position" and i == 1:
            del ds.ImagePositionPatient
        elif problem == "orientation" and i == 1:
            ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
        elif problem == "tilt":
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], float(ds.ImagePositionPatient[1]) + 0.3 * i,
                                       ds.ImagePositionPatient[2]]
        elif problem == "no_pixels" and i == 1:
            del ds.PixelData
        elif problem == "rgb" and i == 1:
            ds.SamplesPerPixel = 3

    match = {"no_position": "ImagePositionPatient", "orientation": "ImageOrientationPatient", "tilt": "tilt",
             "no_pixels": "no pixel data", "rgb": "colour"}[problem]
    with pytest.raises(InputError, match=match):
        io.read_volume(_edit_copies(ge, tmp_path / problem, edit))


# ------------------------------------------------------------------------------------------ image files
@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha", ".nii", ".nhdr", ".mhd"])
def test_image_round_trip(tmp_path, synthetic, ext):
    c, s = np.cos(0.3), np.sin(0.3)
    v = io.CTVolume(hu=synthetic.hu, spacing=synthetic.spacing, origin=synthetic.origin,
                    direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    path = io.write_image(v, tmp_path / f"vol{ext}")
    assert path == tmp_path / f"vol{ext}" and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    back = io.read_image(path)
    assert back.hu.dtype == np.float32 and back.source == str(path)
    np.testing.assert_array_equal(back.hu, v.hu)
    tol = 1e-5 if ext.startswith(".nii") else 1e-9  # NIfTI stores geometry as float32; NRRD spacing*direction
    np.testing.assert_allclose(back.spacing, v.spacing, atol=tol, rtol=0)
    np.testing.assert_allclose(back.origin, v.origin, atol=tol * 100, rtol=0)
    np.testing.assert_allclose(back.direction, v.direction, atol=tol, rtol=0)


def test_read_real_single_slice_images():
    for name, dim in (("test1_B30.mha", 3), ("test1_B10.mha", 2)):  # B10 is stored as a 2-D image
        path = _shared(DATA / "paired_kernels" / name)
        image = sitk.ReadImage(str(path))
        assert image.GetDimension() == dim
        v = io.read_volume(path)
        assert v.hu.shape == (1, 512, 512) and v.hu.dtype == np.float32 and v.spacing[2] == 1.0
        assert len(v.direction) == 9 and v.origin == (0.0, 0.0, 0.0)
        np.testing.assert_array_equal(v.hu.reshape(512, 512), sitk.GetArrayFromImage(image).reshape(512, 512))
    assert io.read_volume(DATA / "paired_kernels" / "test1_B30.mha").spacing[0] == pytest.approx(0.693, abs=1e-3)


def test_2d_image_becomes_one_slice(tmp_path):
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.int16).reshape(3, 4))
    image.SetSpacing((0.5, 0.6))
    image.SetOrigin((10.0, -20.0))
    image.SetDirection((0.0, 1.0, 1.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "slice.nrrd"))
    v = io.read_image(tmp_path / "slice.nrrd")
    assert v.hu.shape == (1, 3, 4) and v.spacing == (0.5, 0.6, 1.0) and v.origin == (10.0, -20.0, 0.0)
    assert v.direction == (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    np.testing.assert_array_equal(v.hu[0], np.arange(12).reshape(3, 4))


def test_read_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        io.read_image(tmp_path / "missing.nrrd")
    bad = tmp_path / "bad.nrrd"
    bad.write_text("not an image")
    with pytest.raises(InputError) as err:
        io.read_image(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.png").write_text("x")
    with pytest.raises(InputError, match="unsupported"):
        io.read_image(tmp_path / "bad.png")
    nan = sitk.GetImageFromArray(np.array([[[0.0, np.nan]]], dtype=np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.mha"))
    with pytest.raises(InputError, match="NaN"):
        io.read_image(tmp_path / "nan.mha")
    sitk.WriteImage(sitk.Image([4, 4, 2], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="components"):
        io.read_image(tmp_path / "rgb.nrrd")
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkFloat32), str(tmp_path / "4d.nrrd"))
    with pytest.raises(InputError, match="4-D"):
        io.read_image(tmp_path / "4d.nrrd")


def test_with_hu(synthetic):
    new = synthetic.with_hu(synthetic.hu * 2)
    assert new.spacing == synthetic.spacing and new.hu.dtype == np.float32
    with pytest.raises(InputError, match="shaped"):
        synthetic.with_hu(synthetic.hu[1:])


# ------------------------------------------------------------------------------------------ writing DICOM
@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_write_synthetic_round_trip(tmp_path, synthetic, oblique):
    if oblique:
        c, s = np.cos(0.3), np.sin(0.3)
        tilt = np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
        synthetic.direction = tuple((np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ tilt).ravel())
    out = io.write_dicom_series(synthetic, tmp_path / "out", series_description="test", convolution_kernel="B30f")
    assert sorted(p.name for p in out.iterdir()) == [f"IM{i:05d}.dcm" for i in range(1, 7)]
    expected = np.rint(synthetic.hu)
    for v in (io.read_dicom_series(out), io.from_sitk(_sitk_series(out))):
        np.testing.assert_array_equal(v.hu, expected)
        np.testing.assert_allclose(v.origin, synthetic.origin, atol=1e-4)
        np.testing.assert_allclose(v.spacing, synthetic.spacing, atol=1e-4)
        np.testing.assert_allclose(v.direction, synthetic.direction, atol=1e-4)
    ds = pydicom.dcmread(out / "IM00001.dcm")
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == io.CT_IMAGE_STORAGE and ds.PatientName == "Anonymous" and ds.PatientID == "LTDiffPP"
    assert ds.SeriesNumber == 1000 and list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert ds.PixelRepresentation == 1 and ds.BitsStored == 16 and ds.pixel_array.dtype == np.int16


def test_dicom_write_real_round_trip_and_tags(tmp_path, philips):
    src = _copy(_philips_files_in_order(philips)[:20], tmp_path / "src")
    v = io.read_volume(src)
    out = io.write_volume(v, tmp_path / "std", series_description="LTDiffPP to B30f", convolution_kernel="B30f")
    back = io.read_volume(out)
    np.testing.assert_array_equal(back.hu, v.hu)
    for a, b in ((back.origin, v.origin), (back.spacing, v.spacing), (back.direction, v.direction)):
        np.testing.assert_allclose(a, b, atol=1e-4)
    _assert_same_as_sitk(back, _sitk_series(out))

    old = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(src.iterdir())]
    new = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(out.iterdir())]
    for kw in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "StudyDate", "KVP"):
        if kw in old[0]:
            assert new[0].get(kw) == old[0].get(kw), kw
    assert new[0].SeriesInstanceUID != old[0].SeriesInstanceUID
    assert len({d.SeriesInstanceUID for d in new}) == 1
    sops = {d.SOPInstanceUID for d in new}
    assert len(sops) == 20 and not sops & {d.SOPInstanceUID for d in old}
    assert [int(d.InstanceNumber) for d in new] == list(range(1, 21))
    assert new[0].ConvolutionKernel == "B30f" and new[0].SeriesDescription == "LTDiffPP to B30f"
    assert list(new[0].ImageType) == ["DERIVED", "SECONDARY", "AXIAL"] and "LTDiffPP" in new[0].DerivationDescription
    assert int(new[0].SeriesNumber) == int(old[0].SeriesNumber) + 1000
    assert float(new[0].SliceThickness) == float(old[0].SliceThickness)


def test_dicom_write_clips_out_of_range(tmp_path, synthetic):
    hu = synthetic.hu.copy()
    hu[0, 0, 0], hu[0, 0, 1] = 1e6, -1e6
    with pytest.warns(UserWarning, match="clipped"):
        out = io.write_dicom_series(synthetic.with_hu(hu), tmp_path / "c", series_description="x",
                                    convolution_kernel="")
    back = io.read_dicom_series(out).hu
    assert back[0, 0, 0] == 32767 and back[0, 0, 1] == -32768


def test_write_volume_dispatch(tmp_path, synthetic):
    assert io.write_volume(synthetic, tmp_path / "a.nrrd").is_file()
    assert io.write_volume(synthetic, tmp_path / "series").is_dir()
    with pytest.raises(OutputError, match="folder"):
        io.write_volume(synthetic, tmp_path / "b.dcm")


def test_inputs_unchanged_by_read_and_write(tmp_path, siemens):
    before = _sha256_tree(siemens)
    v = io.read_volume(siemens)
    io.write_volume(v, tmp_path / "dcm", convolution_kernel="B30f")
    io.write_volume(v, tmp_path / "v.nrrd")
    assert _sha256_tree(siemens) == before


# ------------------------------------------------------------------------------------------ atomic output
def test_atomic_output_file(tmp_path):
    final = tmp_path / "out.bin"
    with io.atomic_output(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-")
        tmp.write_bytes(b"one")
    assert final.read_bytes() == b"one"
    with pytest.raises(OutputError, match="exists"):
        with io.atomic_output(final):
            pytest.fail("must refuse before any work")
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_output(final, overwrite=True) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert final.read_bytes() == b"one" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with io.atomic_output(final, overwrite=True) as tmp:
        tmp.write_bytes(b"two")
    assert final.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    with pytest.raises(OutputError, match="does not exist"):
        with io.atomic_output(tmp_path / "nowhere" / "x.bin"):
            pass


def test_atomic_output_folder(tmp_path):
    final = tmp_path / "series"
    with io.atomic_output(final, is_dir=True) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(KeyError):
        with io.atomic_output(final, overwrite=True, is_dir=True) as tmp:
            (tmp / "b").write_text("new")
            raise KeyError("fail")
    assert [p.name for p in final.iterdir()] == ["a"] and [p.name for p in tmp_path.iterdir()] == ["series"]
    with io.atomic_output(final, overwrite=True, is_dir=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in final.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["series"]


def test_failed_writes_leave_nothing(tmp_path, synthetic, monkeypatch):
    io.write_image(synthetic, tmp_path / "v.nrrd")
    before = (tmp_path / "v.nrrd").read_bytes()
    with pytest.raises(OutputError, match="exists"):
        io.write_image(synthetic.with_hu(synthetic.hu + 1), tmp_path / "v.nrrd")
    with pytest.raises(OutputError, match="exists"):
        io.write_dicom_series(synthetic, tmp_path / "v.nrrd", series_description="x", convolution_kernel="",
                              overwrite=True)
    assert (tmp_path / "v.nrrd").read_bytes() == before

    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    original = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", failing_save)
    with pytest.raises(OutputError, match="disk full"):
        io.write_dicom_series(synthetic, tmp_path / "series", series_description="x", convolution_kernel="")
    assert [p.name for p in tmp_path.iterdir()] == ["v.nrrd"]


# ------------------------------------------------------------------------------------------ property-based
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _rotation(q) -> tuple[float, ...]:
    """A proper rotation matrix (row-major) from a non-zero quaternion."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    m = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                  [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                  [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
    return tuple(m.ravel())


_quaternion = st.tuples(*[st.floats(-1, 1) for _ in range(4)]).filter(lambda q: np.linalg.norm(q) > 0.1)
_spacing = st.tuples(*[st.floats(0.05, 20.0) for _ in range(3)])
_origin = st.tuples(*[st.floats(-2000.0, 2000.0) for _ in range(3)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spacing=_spacing, origin=_origin, q=_quaternion, ext=st.sampled_from([".nrrd", ".mha", ".nii.gz"]))
def test_image_geometry_round_trip_property(tmp_path_factory, spacing, origin, q, ext):
    """Any spacing, origin and rotation survives write_image/read_image (NIfTI: float32 precision)."""
    hu = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 1000
    v = io.CTVolume(hu=hu, spacing=spacing, origin=origin, direction=_rotation(q))
    back = io.read_image(io.write_image(v, tmp_path_factory.mktemp("geo") / f"v{ext}"))
    np.testing.assert_array_equal(back.hu, hu)
    rel = 1e-5 if ext == ".nii.gz" else 1e-12
    np.testing.assert_allclose(back.spacing, spacing, rtol=rel)
    np.testing.assert_allclose(back.origin, origin, rtol=0, atol=2000 * rel + 1e-9)
    np.testing.assert_allclose(back.direction, v.direction, rtol=0, atol=1e-5 if ext == ".nii.gz" else 1e-9)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spacing=_spacing, origin=_origin, q=_quaternion)
def test_dicom_geometry_round_trip_property(tmp_path_factory, spacing, origin, q):
    """Any geometry survives write_dicom_series/read_dicom_series to the precision of DICOM decimal strings
    (16 characters, rounded to 1e-6 mm by the writer)."""
    hu = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) - 1000
    v = io.CTVolume(hu=hu, spacing=spacing, origin=origin, direction=_rotation(q))
    back = io.read_dicom_series(io.write_dicom_series(v, tmp_path_factory.mktemp("geo") / "s",
                                                      series_description="p", convolution_kernel=""))
    np.testing.assert_array_equal(back.hu, hu)
    np.testing.assert_allclose(back.spacing, spacing, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(back.origin, origin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(back.direction, v.direction, rtol=0, atol=1e-4)


def test_cpu_name_tells_the_cpu_generation_apart():
    """Benchmarks and model cards record the CPU; VMs often call different generations just "AMD EPYC"."""
    from pathlib import Path

    from LTDiffPPLib.io import cpu_name

    name = cpu_name()
    assert name and name == cpu_name()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if "cpu family" in info and "model name" in info:
        assert "family" in name and "model" in name
