"""The domain guard: every input is checked before any work; refused (nothing written) or adapted and said so."""

import json
import math
import warnings

import numpy as np
import pydicom
import pytest

from LTDiffPPLib import io
from LTDiffPPLib.cli import main
from LTDiffPPLib.errors import InputError
from LTDiffPPLib.guard import (DomainError, DomainWarning, NothingToConvert, axial_axes, model_for_pair,
                               plan_conversion)
from LTDiffPPLib.inference import standardize, standardize_volume
from LTDiffPPLib.kernels import get_kernel

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
# direction: row-major 3x3, column j = patient (LPS) direction of SimpleITK axis j (x, y, z)
SAGITTAL = (0.0, 0, -1.0, 1.0, 0, 0, 0, -1.0, 0)   # x = P, y = -S (rows run head to foot), z = -L
CORONAL = (1.0, 0, 0, 0, 0, -1.0, 0, -1.0, 0)      # x = L, y = -S, z = -P
S_ALONG_X = (0.0, 1.0, 0, 0, 0, 1.0, 1.0, 0, 0)    # x = S, y = L, z = P


def _volume(shape=(3, 40, 36), spacing=(0.7, 0.7, 2.0), direction=IDENTITY, seed=0) -> io.CTVolume:
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0, np.float32)
    hu[:, 3:-3, 3:-3] = rng.normal(30, 25, (shape[0], shape[1] - 6, shape[2] - 6))
    return io.CTVolume(hu=hu, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=direction, source="vol")


def _with_header(vol: io.CTVolume, kernel, manufacturer="SIEMENS") -> io.CTVolume:
    ds = pydicom.Dataset()
    ds.Manufacturer, ds.ConvolutionKernel, ds.Modality = manufacturer, kernel, "CT"
    vol.dicom_header = ds
    return vol


def test_source_kernel_from_the_dicom_header_picks_the_shipped_model_for_the_pair():
    plan = plan_conversion(_with_header(_volume(), "B30f"), "B70f")
    assert plan.source.kernel.name == "B30f" and plan.source.how == "DICOM header"
    assert plan.model == "ltdiffpp-b30f-b70f" and plan.target.name == "B70f"
    assert plan_conversion(_with_header(_volume(), ["B30f", "3"]), "B50f").model == "ltdiffpp-b30f-b50f"
    assert model_for_pair(get_kernel("B31f"), get_kernel("B70f")) == "ltdiffpp-b30f-b70f"  # an equivalent kernel


def test_default_target_is_the_default_models():
    assert plan_conversion(_volume(), source_kernel="B30f").target.name == "B70f"


def test_unknown_source_is_refused_with_how_to_override(tiny_model_path):
    with pytest.raises(DomainError, match="source kernel unknown.*--source-kernel.*--force to treat it as B30f"):
        plan_conversion(_volume(), "B70f")
    with pytest.raises(DomainError, match=r"SIEMENS kernel 'I30f\\\\3' is not in the kernel library"):
        plan_conversion(_with_header(_volume(), "I30f\\3"), "B70f")
    with pytest.warns(DomainWarning, match="treated as B30f"):
        plan = plan_conversion(_volume(), "B70f", force=True)
    assert plan.source.kernel.name == "B30f" and "source kernel unknown" in plan.overridden[0]


def test_a_given_kernel_contradicting_the_header_needs_force():
    vol = _with_header(_volume(), "B50f")
    with pytest.raises(DomainError, match="--source-kernel B30f was given, but the header says B50f"):
        plan_conversion(vol, "B70f", source_kernel="B30f")
    with pytest.warns(DomainWarning):
        assert plan_conversion(vol, "B70f", source_kernel="B30f", force=True).source.kernel.name == "B30f"
    # a header kernel with no known response: the given kernel stands in for it (recorded, no force needed)
    plan = plan_conversion(_with_header(_volume(), ["Br38f", "3"]), "B70f", source_kernel="B30f")
    assert "Br38f" in plan.provenance()["source_kernel"]


def test_kernels_without_a_response_or_a_model_are_refused(tmp_path, monkeypatch):
    with pytest.raises(DomainError, match="Philips-C .* no known frequency response"):
        plan_conversion(_with_header(_volume(), "C", "Philips"), "B70f")
    # a pair without a per-pair model goes to the kernel-conditioned model ...
    assert plan_conversion(_volume(), "B70f", source_kernel="B10f").model == "ltdiffpp-kernel-conditioned"
    # ... and without it (a registry of the per-pair models only) is refused, naming what is shipped
    from LTDiffPPLib import modelcard

    reg = json.loads(modelcard.REGISTRY_PATH.read_text())
    reg["models"] = [m for m in reg["models"] if m["source_kernel"] != "any"]
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    monkeypatch.setattr(modelcard, "REGISTRY_PATH", tmp_path / "registry.json")
    with pytest.raises(DomainError, match="no shipped model converts B10f -> B70f.*B30f->B70f"):
        plan_conversion(_volume(), "B70f", source_kernel="B10f")
    with pytest.raises(InputError, match="unknown kernel 'B71x'"):
        plan_conversion(_volume(), "B71x", source_kernel="B30f")


def test_nothing_to_convert():
    with pytest.raises(NothingToConvert, match="already B70f"):
        plan_conversion(_with_header(_volume(), "B70f"), "B70f")


def test_an_explicit_model_must_match_the_pair(tiny_model_path):
    with pytest.raises(DomainError, match="converts to B70f, not to B50f"):
        plan_conversion(_volume(), "B50f", source_kernel="B30f", model=tiny_model_path)
    with pytest.raises(DomainError, match="converts from B30f, but the input is B10f"):
        plan_conversion(_volume(), "B70f", source_kernel="B10f", model=tiny_model_path)


@pytest.mark.parametrize("direction, expect", [(IDENTITY, None), (SAGITTAL, (1, 0, 2)), (CORONAL, (1, 0, 2)),
                                               (S_ALONG_X, (2, 0, 1))])
def test_axial_axes(direction, expect):
    assert axial_axes(direction) == expect


def test_oblique_is_refused_unless_forced(tiny_model_path):
    c, s = math.cos(math.radians(45)), math.sin(math.radians(45))
    oblique = (1.0, 0, 0, 0, c, -s, 0, s, c)
    assert axial_axes(oblique) == "oblique"
    vol = _volume(direction=oblique)
    with pytest.raises(DomainError, match="oblique"):
        plan_conversion(vol, source_kernel="B30f", model=tiny_model_path)
    with pytest.warns(DomainWarning, match="oblique"):
        assert plan_conversion(vol, source_kernel="B30f", model=tiny_model_path, force=True).axes is None


def test_sagittal_stack_is_converted_as_axial_slices_and_put_back(tiny_model):
    # a sagittal stack: numpy axes (x-slices, ...) — the same voxels as an axial volume, permuted
    axial = _volume(shape=(34, 40, 36), spacing=(0.7, 0.7, 0.7))
    sag_hu = np.ascontiguousarray(axial.hu.transpose(2, 0, 1)[:, ::-1, :])  # (x, z, y) with -S rows
    sag = io.CTVolume(hu=sag_hu, spacing=(0.7, 0.7, 0.7), origin=(0.0, 0.0, 0.0), direction=(0.0, 0, 1.0, 1.0, 0, 0, 0, -1.0, 0))
    assert axial_axes(sag.direction) == (1, 0, 2)
    with pytest.warns(DomainWarning, match="sagittal stack reformatted to axial"):
        out, plan = standardize_volume(sag, source_kernel="B30f", model=tiny_model, steps=1)
    assert out.hu.shape == sag.hu.shape and plan.axes == (1, 0, 2)
    # the conversion ran on the (z, y, x)-ordered axial planes of the stack
    ref = standardize(sag_hu.transpose(1, 0, 2), (0.7, 0.7, 0.7), tiny_model, steps=1)
    np.testing.assert_array_equal(out.hu, ref.transpose(1, 0, 2))


def test_pixel_size_outside_the_trained_range_is_resampled_and_back(tiny_model):
    vol = _volume(shape=(2, 48, 44), spacing=(1.6, 1.6, 2.0))  # tiny model trained 0.5-1.0 mm
    with pytest.warns(DomainWarning, match="resampled to 1 mm"):
        out, plan = standardize_volume(vol, source_kernel="B30f", model=tiny_model, steps=1)
    assert plan.pixel_mm == (1.0, 1.0) and out.hu.shape == vol.hu.shape and out.spacing == vol.spacing
    assert np.isfinite(out.hu).all()
    with warnings.catch_warnings():  # a filterable category: users can make adaptations errors
        warnings.simplefilter("error", DomainWarning)
        with pytest.raises(DomainWarning):
            plan_conversion(vol, source_kernel="B30f", model=tiny_model.path)


def test_small_and_non_hu_images_are_refused(tiny_model_path):
    with pytest.raises(DomainError, match="16 x 16 px are too small"):
        plan_conversion(_volume(shape=(1, 16, 16)), source_kernel="B30f", model=tiny_model_path)
    shot = _volume()
    shot.hu = np.clip(shot.hu / 8 + 128, 0, 255).round().astype(np.float32)
    with pytest.raises(DomainError, match="not Hounsfield units.*8-bit display image"):
        plan_conversion(shot, source_kernel="B30f", model=tiny_model_path)
    raw = _volume()
    raw.hu = raw.hu + 1024
    with pytest.raises(DomainError, match="raw unsigned stored values"):
        plan_conversion(raw, source_kernel="B30f", model=tiny_model_path)


def test_cli_refusal_writes_nothing_and_force_records_the_override(tmp_path, tiny_model_path, capsys):
    src = io.write_volume(_volume(), tmp_path / "in.nrrd")
    before = src.read_bytes()
    out = tmp_path / "out.nrrd"
    assert main(["standardize", str(src), str(out), "--model", str(tiny_model_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ltdiffpp: error: ") and "source kernel unknown" in err
    assert not out.exists() and src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd"]
    dcm = tmp_path / "forced"
    with pytest.warns(DomainWarning, match="converted despite: source kernel unknown"):  # the CLI prints it as one
        assert main(["standardize", str(src), str(dcm), "--model", str(tiny_model_path), "--steps", "1",  # line
                     "--force", "--quiet"]) == 0
    header = io.read_volume(dcm).dicom_header
    assert "overridden: source kernel unknown" in header.DerivationDescription
    assert "B30f" in header.DerivationDescription and header.ConvolutionKernel == "B70f"
    assert src.read_bytes() == before


def test_real_series_of_other_vendors_are_identified_and_refused(shared_data, tmp_path, capsys):
    ge = shared_data / "chest_ct" / "dcmqi_ge_standard"
    assert main(["standardize", str(ge), str(tmp_path / "ge.nrrd"), "--quiet"]) == 2
    err = capsys.readouterr().err  # the kernel-conditioned model could convert it, but its response is doubtful
    assert "source kernel GE-STANDARD's library response is doubtful" in err and "--force" in err
    plan = plan_conversion(io.read_volume(ge), "B70f", force=True, warn=False)
    assert plan.model == "ltdiffpp-kernel-conditioned" and "doubtful" in plan.provenance()["overridden"]
    philips = shared_data / "chest_ct" / "itkelastix_philips_C"
    vol = io.read_volume(philips)
    with pytest.raises(DomainError, match="Philips-C"):
        plan_conversion(vol, "B70f")
    assert not any(tmp_path.iterdir())
