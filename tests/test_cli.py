"""The ltdiffpp CLI end to end: real files in, real files out, through the real model loader."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from LTDiffPPLib.cli import main
from LTDiffPPLib.io import CTVolume, read_volume, write_volume
from LTDiffPPLib.phantom import qa_phantom

IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)


@pytest.fixture
def small_nrrd(tmp_path) -> Path:
    vol = CTVolume(hu=qa_phantom((3, 40, 36), spacing_mm=6.0, seed=0), spacing=(0.7, 0.7, 2.5),
                   origin=(-12.5, 30.0, 101.25), direction=IDENTITY)
    return write_volume(vol, tmp_path / "in.nrrd")


def test_standardize_image_to_image_keeps_geometry(small_nrrd, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    rc = main(["standardize", str(small_nrrd), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "2", "--quiet"])
    assert rc == 0
    src, res = read_volume(small_nrrd), read_volume(out)
    assert res.hu.shape == src.hu.shape
    np.testing.assert_allclose(res.spacing, src.spacing, atol=1e-5)
    np.testing.assert_allclose(res.origin, src.origin, atol=1e-4)
    np.testing.assert_allclose(res.direction, src.direction, atol=1e-6)
    assert not np.array_equal(res.hu, src.hu)


def test_standardize_to_dicom_series(small_nrrd, tiny_model_path, tmp_path):
    out = tmp_path / "dicom_out"
    assert main(["standardize", str(small_nrrd), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "2",
                 "--seed", "5", "--quiet"]) == 0
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 3
    ds = pydicom.dcmread(files[0])
    assert ds.ConvolutionKernel == "B70f"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert "B30f->B70f" in ds.SeriesDescription and "seed 5" in ds.SeriesDescription
    back = read_volume(out)
    np.testing.assert_allclose(back.origin, read_volume(small_nrrd).origin, atol=1e-4)


def test_same_seed_same_output(small_nrrd, tiny_model_path, tmp_path):
    outs = []
    for name in ("a.nrrd", "b.nrrd"):
        main(["standardize", str(small_nrrd), str(tmp_path / name), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "2",
              "--quiet"])
        outs.append(read_volume(tmp_path / name).hu)
    np.testing.assert_array_equal(*outs)


def test_existing_output_is_refused_before_any_work_and_left_intact(small_nrrd, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "exists.nrrd"
    out.write_bytes(b"precious")
    rc = main(["standardize", str(small_nrrd), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    assert out.read_bytes() == b"precious"
    assert main(["standardize", str(small_nrrd), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1",
                 "--overwrite", "--quiet"]) == 0
    assert read_volume(out).hu.shape == (3, 40, 36)


@pytest.mark.parametrize("kind,expect", [
    ("missing", "does not exist"),
    ("empty folder", "No DICOM"),
    ("text file", "unsupported image format"),
])
def test_bad_input_gives_one_line_and_exit_2(kind, expect, tiny_model_path, tmp_path, capsys):
    src = tmp_path / "input"
    if kind == "empty folder":
        src.mkdir()
    elif kind == "text file":
        src = tmp_path / "x.txt"
        src.write_text("hi")
    rc = main(["standardize", str(src), str(tmp_path / "o.nrrd"), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and err.startswith("ltdiffpp: error:")
    assert not (tmp_path / "o.nrrd").exists()


def test_bad_settings_give_exit_2(small_nrrd, tiny_model_path, tmp_path, capsys):
    rc = main(["standardize", str(small_nrrd), str(tmp_path / "o.nrrd"), "--model", str(tiny_model_path), "--source-kernel", "B30f",
               "--steps", "0", "--quiet"])
    assert rc == 2 and "steps" in capsys.readouterr().err
    assert not (tmp_path / "o.nrrd").exists()


def test_bad_model_gives_one_line_and_exit_2(small_nrrd, tmp_path, capsys):
    rc = main(["standardize", str(small_nrrd), str(tmp_path / "o.nrrd"), "--model", "no-such-model"])
    assert rc == 2 and "no such model file" in capsys.readouterr().err


def test_info_prints_metadata_and_checksum(tiny_model_path, capsys):
    from LTDiffPPLib.modelfile import sha256_file

    assert main(["info", str(tiny_model_path)]) == 0
    out = capsys.readouterr().out
    assert sha256_file(tiny_model_path) in out and "B30f -> B70f" in out and "UNTRAINED" in out
    assert main(["info", str(tiny_model_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == sha256_file(tiny_model_path) and info["metadata"]["name"] == "tiny-test"


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    assert capsys.readouterr().out.strip()


def test_console_script_runs_with_progress_bar(small_nrrd, tiny_model_path, tmp_path):
    """The installed entry point, in its own process, as a user would run it."""
    exe = Path(sys.executable).parent / "ltdiffpp"
    if not exe.exists():
        pytest.skip(f"console script {exe} not installed (run `make test`, which installs the project)")
    out = tmp_path / "cs.mha"
    p = subprocess.run([str(exe), "standardize", str(small_nrrd), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f",
                        "--steps", "2"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "slices" in p.stderr and "wrote" in p.stdout  # tqdm bar on stderr, summary on stdout
    assert out.is_file()


def test_output_cut_short_by_a_closed_pipe_is_no_traceback(tiny_model_path):
    """`ltdiffpp info MODEL | head -1`: the reader goes away; the CLI stops quietly with 141, like `cat`.
    (`true` exits without reading, long before the CLI has imported torch and printed.)"""
    p = subprocess.run(f"{sys.executable} -m LTDiffPPLib.cli info {tiny_model_path} | true; "
                       "echo ${PIPESTATUS[0]}", shell=True, capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1], executable="/bin/bash")
    assert p.stdout.strip() == "141", p.stderr
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


def test_real_dicom_series_end_to_end(shared_data, tiny_model_path, tmp_path):
    """The real Siemens Br38f series (JPEG 2000, 20 slices) in, a DICOM series out, tags carried over."""
    src = shared_data / "chest_ct" / "totalsegmentator_siemens_Br38f"
    out = tmp_path / "std"
    assert main(["standardize", str(src), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1",
                 "--batch-size", "10", "--quiet"]) == 0
    vin, vout = read_volume(src), read_volume(out)
    assert vout.hu.shape == vin.hu.shape == (20, 512, 512)
    np.testing.assert_allclose(vout.spacing, vin.spacing, atol=1e-4)
    np.testing.assert_allclose(vout.origin, vin.origin, atol=1e-4)
    np.testing.assert_allclose(vout.direction, vin.direction, atol=1e-6)
    a, b = pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True), vout.dicom_header
    # carried over; a source without a StudyInstanceUID (type 1, this one has it empty) gets a new study
    assert b.PatientID == a.PatientID and b.StudyInstanceUID == (a.StudyInstanceUID or b.StudyInstanceUID)
    assert b.StudyInstanceUID
    assert b.SeriesInstanceUID != a.SeriesInstanceUID and b.ConvolutionKernel == "B70f"
