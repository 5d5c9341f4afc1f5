"""Reliability and security (issue 8): every bad input of the issue's list through the CLI and the API,
integrity of model files and outputs (tampering, SIGKILL mid-write, inputs untouched), determinism
across processes, and provenance in the outputs. docs/RELIABILITY.md tabulates what each case gets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from LTDiffPPLib import io, modelfile
from LTDiffPPLib.cli import main
from LTDiffPPLib.errors import InputError, LTDiffPPError, ModelFileError, OutputError
from LTDiffPPLib.modelfile import sha256_file

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(n: int = 4, size: int = 32, seed: int = 0) -> io.CTVolume:
    """A small CT-like volume: air border, soft tissue, some bone."""
    rng = np.random.default_rng(seed)
    hu = np.full((n, size, size), -1000.0, np.float32)
    hu[:, 4:-4, 4:-4] = rng.normal(40, 20, (n, size - 8, size - 8))
    hu[:, size // 2 - 3:size // 2 + 3, size // 2 - 3:size // 2 + 3] = 1200
    return io.CTVolume(hu=hu, spacing=(0.75, 0.75, 2.5), origin=(-12.0, -12.0, 40.0), direction=IDENTITY)


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """A valid 4-slice CT series written by the library."""
    return io.write_dicom_series(_volume(), tmp_path_factory.mktemp("rel") / "series", series_description="base",
                                 convolution_kernel="B30f")


def _edited(series: Path, dst: Path, edit) -> Path:
    """A copy of ``series`` with ``edit(ds, index)`` applied to every file (sorted by name = position)."""
    dst.mkdir()
    for i, f in enumerate(sorted(series.iterdir())):
        ds = pydicom.dcmread(f)
        if edit(ds, i) is not False:
            ds.save_as(dst / f.name)
    return dst


def _set(**kw):
    def edit(ds, i):
        for key, (index, value) in kw.items():
            if index is None or index == i:
                if value is None:
                    delattr(ds, key)
                else:
                    setattr(ds, key, value)
    return edit


def _image(tmp: Path, name: str, array: np.ndarray, vector: bool = False) -> Path:
    image = sitk.GetImageFromArray(array, isVector=vector)
    sitk.WriteImage(image, str(tmp / name))
    return tmp / name


def _raw_header(tmp: Path, name: str, sizes: str) -> Path:
    (tmp / f"{name}.raw").write_bytes(b"\0" * 64)
    (tmp / f"{name}.nhdr").write_text(f"NRRD0004\ntype: float\ndimension: 3\nsizes: {sizes}\nendian: little\n"
                                      f"encoding: raw\ndata file: {name}.raw\n\n")
    return tmp / f"{name}.nhdr"


def _raw_element(index: int, tag: int, vr: str, value: bytes):
    """Store ``value`` as the raw bytes of an element (pydicom would refuse a malformed value)."""
    def edit(ds, i):
        if i == index:
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return edit


def _shift_z(offsets):
    def edit(ds, i):
        p = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1], 40.0 + offsets[i]]
    return edit


def _tilt(ds, i):
    p = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [p[0], p[1] + 0.5 * i, p[2]]


def _truncate(series: Path, dst: Path, keep: float) -> Path:
    dst.mkdir()
    for f in sorted(series.iterdir()):
        data = f.read_bytes()
        (dst / f.name).write_bytes(data[: int(len(data) * keep)] if f.name == "IM00002.dcm" else data)
    return dst


def _garble(series: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in sorted(series.iterdir()):
        data = bytearray(f.read_bytes())
        if f.name == "IM00003.dcm":
            data[140:400] = bytes(range(256))[:260] + b"\xff" * 4  # garbage right after the DICM marker
        (dst / f.name).write_bytes(bytes(data))
    return dst


def _two_series(series: Path, dst: Path) -> Path:
    other = _edited(series, dst.parent / (dst.name + "_b"), _set(SeriesInstanceUID=(None, "1.2.826.0.1.99")))
    _edited(series, dst, lambda ds, i: None)
    for f in other.iterdir():
        f.rename(dst / f"B{f.name}")
    return dst


def _no_dicom(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    return folder


def _rgb(ds, i):
    if i == 1:
        ds.SamplesPerPixel = 3


def _multiframe(ds, i):
    if i == 1:
        ds.NumberOfFrames = 2


def _dup(series: Path, dst: Path) -> Path:
    _edited(series, dst, lambda ds, i: None)
    (dst / "IM00002b.dcm").write_bytes((dst / "IM00002.dcm").read_bytes())
    return dst


def _gap(series: Path, dst: Path) -> Path:
    big = io.write_dicom_series(_volume(6), dst.parent / (dst.name + "_6"), series_description="x",
                                convolution_kernel="")
    return _edited(big, dst, lambda ds, i: False if i == 2 else None)


# name -> (build(series, tmp) -> input path, expected message fragment, name that the message must contain)
BAD_INPUTS = {
    "folder without DICOM": (lambda s, t: _no_dicom(t / "x"), "No DICOM image files", "x"),
    "non-CT modality": (lambda s, t: _edited(s, t / "x", _set(Modality=(None, "MR"))), "not CT", "x"),
    "several series, no choice": (lambda s, t: _two_series(s, t / "x"), "--series-uid", "x"),
    "RescaleSlope without RescaleIntercept": (
        lambda s, t: _edited(s, t / "x", _set(RescaleIntercept=(2, None))), "without RescaleIntercept", "IM00003"),
    "rescale missing in some files": (
        lambda s, t: _edited(s, t / "x", _set(RescaleIntercept=(1, None), RescaleSlope=(1, None))), "Inconsistent",
        "IM00002"),
    "RescaleSlope 0": (lambda s, t: _edited(s, t / "x", _set(RescaleSlope=(3, "0"))), "RescaleSlope is 0", "IM00004"),
    "RescaleIntercept not numeric": (
        lambda s, t: _edited(s, t / "x", _raw_element(0, 0x00281052, "DS", b"-1O24 ")), "not numeric", "IM00001"),
    "duplicated slice": (lambda s, t: _dup(s, t / "x"), "same slice position", "IM00002b.dcm"),
    "missing slice (gap)": (lambda s, t: _gap(s, t / "x"), "Irregular slice spacing", "IM00002.dcm"),
    "non-uniform spacing": (lambda s, t: _edited(s, t / "x", _shift_z([0.0, 2.5, 5.0, 8.5])),
                            "Irregular slice spacing", "IM00003.dcm"),
    "gantry tilt": (lambda s, t: _edited(s, t / "x", _tilt), "gantry tilt", "x"),
    "RGB DICOM": (lambda s, t: _edited(s, t / "x", _rgb), "colour", "IM00002"),
    "multi-frame (4D) DICOM": (lambda s, t: _edited(s, t / "x", _multiframe), "multi-frame", "IM00002"),
    "4D image": (lambda s, t: _image(t, "x.nrrd", np.zeros((2, 3, 4, 5), np.float32)), "4-D", "x.nrrd"),
    "RGB image": (lambda s, t: _image(t, "x.nrrd", np.zeros((3, 4, 5, 3), np.uint8), vector=True), "components",
                  "x.nrrd"),
    "NaN voxels": (lambda s, t: _image(t, "x.mha", np.array([[[0.0, np.nan]]], np.float32)), "NaN", "x.mha"),
    "Inf voxels": (lambda s, t: _image(t, "x.nrrd", np.array([[[0.0, np.inf]]], np.float32)), "infinite",
                   "x.nrrd"),
    "empty volume": (lambda s, t: _raw_header(t, "x", "0 4 4"), "size is zero", "x.nhdr"),
    "far outside the HU range": (lambda s, t: _image(t, "x.nrrd", np.full((2, 4, 4), 2.0e6, np.float32)),
                                 "far outside the Hounsfield scale", "x.nrrd"),
    "truncated DICOM file": (lambda s, t: _truncate(s, t / "x", 0.6), "invalid pixel data", "IM00002.dcm"),
    "DICOM header truncated": (lambda s, t: _truncate(s, t / "x", 0.05), "truncated or corrupted", "IM00002.dcm"),
    "corrupted DICOM header": (lambda s, t: _garble(s, t / "x"), "corrupted", "IM00003.dcm"),
    "too large for memory (header 1e5^3)": (lambda s, t: _raw_header(t, "x", "100000 100000 100000"),
                                            "needs about", "x.nhdr"),
    "single DICOM file instead of folder": (lambda s, t: s / "IM00001.dcm", "single DICOM file", "IM00001.dcm"),
    "missing input": (lambda s, t: t / "nothing.nrrd", "does not exist", "nothing.nrrd"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_cli_and_api(case, series, tiny_model_path, tmp_path, capsys):
    build, expect, named = BAD_INPUTS[case]
    src = build(series, tmp_path)
    with pytest.raises(InputError, match=expect) as err:  # API: the library's own type, naming the file
        io.read_volume(src)
    assert named in str(err.value)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.nrrd"
    rc = main(["standardize", str(src), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1", "--quiet"])
    cli_err = capsys.readouterr().err
    assert rc == 2, cli_err
    assert cli_err.startswith("ltdiffpp: error:") and expect in cli_err and named in cli_err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, not even a temporary


def test_too_large_dicom_series_is_refused_before_reading_pixels(series, monkeypatch):
    needed = 4 * 32 * 32 * 4
    monkeypatch.setattr(io.volume, "available_memory", lambda: needed // 2)

    def no_pixels(*a, **k):
        raise AssertionError("pixels were read before the memory check")

    monkeypatch.setattr(io.dicom_read, "_slice_hu", no_pixels)
    with pytest.raises(InputError, match=r"4 × 32 × 32 volume needs about .* only .* is available") as err:
        io.read_volume(series)
    assert str(series) in str(err.value)
    monkeypatch.setattr(io.volume, "available_memory", lambda: None)  # unknown: no check
    with pytest.raises(InputError, match="pixels were read before the memory check"):
        io.read_volume(series)


def test_available_memory_is_plausible():
    avail = io.available_memory()
    assert avail is None or 0 < avail < 2**50


def test_raw_unsigned_values_warn_clearly(series, tmp_path, tiny_model_path, capsys):
    """Missing intercept on unsigned stored values (air 0, water 1024): read, with two warnings."""
    def raw(ds, i):
        del ds.RescaleSlope, ds.RescaleIntercept
        ds.PixelRepresentation = 0
        ds.PixelData = (ds.pixel_array.astype(np.int32) + 1024).clip(0).astype("<u2").tobytes()

    folder = _edited(series, tmp_path / "raw", raw)
    with pytest.warns(UserWarning) as record:
        v = io.read_volume(folder)
    text = " ".join(str(w.message) for w in record)
    assert "RescaleSlope/RescaleIntercept missing in all 4 files" in text and "raw unsigned" in text
    assert v.hu.min() >= 0
    nrrd = io.write_image(v, tmp_path / "raw.nrrd")
    with pytest.warns(UserWarning, match="raw unsigned"):
        io.read_volume(nrrd)


def test_mismatched_pair_in_dataset_building(tmp_path, capsys):
    a, b = _volume(2), _volume(3)
    io.write_image(a, tmp_path / "a.nrrd")
    io.write_image(b, tmp_path / "b.nrrd")
    rc = main(["build-dataset", str(tmp_path / "ds"), "--file-pair", f"{tmp_path / 'a.nrrd'}={tmp_path / 'b.nrrd'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ltdiffpp: error:") and "b.nrrd" in err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("case", ["unknown name", "wrong format version", "pickle"])
def test_bad_model_cli(case, series, tiny_model_path, tmp_path, capsys):
    if case == "unknown name":
        model, expect = "br40-to-bl64", "br40-to-bl64"
    elif case == "wrong format version":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(tiny_model_path), framework="pt") as f:
            header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
        header["format_version"] = "99"
        model, expect = str(tmp_path / "future.safetensors"), "format version '99' is not supported"
        save_file(tensors, model, metadata=header)
    else:
        import torch

        model, expect = str(tmp_path / "evil.safetensors"), "never unpickles"
        torch.save({"w": torch.zeros(1)}, model)
    rc = main(["standardize", str(series), str(tmp_path / "o.nrrd"), "--model", model, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("ltdiffpp: error:") and expect in err
    assert not (tmp_path / "o.nrrd").exists()


def test_output_exists_or_not_writable(series, tiny_model_path, tmp_path, capsys):
    args = ["--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1", "--quiet"]
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    assert main(["standardize", str(series), str(existing), *args]) == 2
    assert "already exists" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "precious"
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["standardize", str(series), str(blocker / "out.nrrd"), *args]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(blocker) in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:  # root ignores permission bits: exercise the refusal through os.access
            stack.enter_context(mock.patch.object(os, "access", return_value=False))
        with pytest.raises(OutputError, match="not writable"):
            io.check_output_path(ro / "x.nrrd")
        assert main(["standardize", str(series), str(ro / "x.nrrd"), *args]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(ro) in err and list(ro.iterdir()) == []


# ------------------------------------------------------------------------------------------ integrity
def _sha_tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tampered_registered_model_refused_by_cli(series, tiny_model_path, tmp_path, monkeypatch, capsys):
    res = tmp_path / "resources"
    (res / "models").mkdir(parents=True)
    model = res / "models" / "tiny.safetensors"
    data = bytearray(tiny_model_path.read_bytes())
    expected = hashlib.sha256(data).hexdigest()
    entry = {"name": "tiny", "file": "tiny.safetensors", "sha256": expected, "source_kernel": "B30f",
             "target_kernel": "B70f", "description": "test"}
    (res / "registry.json").write_text(json.dumps({"format_version": 1, "default": "tiny", "models": [entry]}))
    monkeypatch.setattr(modelfile, "RESOURCES", res)
    monkeypatch.setattr(modelfile, "REGISTRY_PATH", res / "registry.json")
    data[len(data) // 2] ^= 0xFF  # one byte in the weights
    model.write_bytes(bytes(data))
    actual = sha256_file(model)
    rc = main(["standardize", str(series), str(tmp_path / "o.nrrd"), "--model", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "checksum mismatch" in err and expected in err and actual in err
    assert not (tmp_path / "o.nrrd").exists()


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen([sys.executable, "-m", "LTDiffPPLib.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_write_leaves_the_old_output_intact(tiny_model_path, tmp_path):
    src = io.write_image(_volume(160, 32, seed=3), tmp_path / "in.nrrd")
    out = tmp_path / "out"
    io.write_dicom_series(_volume(2), out, series_description="old", convolution_kernel="")
    before = _sha_tree(out)
    proc = _cli("standardize", str(src), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1",
                "--batch-size", "160", "--overwrite", "--quiet")
    deadline, killed_in = time.monotonic() + 120, None
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if temps and any(temps[0].iterdir()):  # the writer has started filling its temporary folder
            proc.send_signal(signal.SIGKILL)
            killed_in = temps[0]
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert killed_in is not None, f"never saw the write start: {proc.stderr.read()}"
    assert proc.returncode == -signal.SIGKILL
    assert _sha_tree(out) == before  # the old series, byte for byte
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == ["in.nrrd", "out"]
    assert killed_in.exists() and len(list(killed_in.iterdir())) < 160  # a partial, hidden temporary only
    # the next run replaces the output and removes the dead writer's temporary
    assert main(["standardize", str(src), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1", "--overwrite",
                 "--quiet"]) == 0
    assert io.read_volume(out).hu.shape == (160, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd", "out"]


def test_inputs_and_model_unchanged_by_a_cli_run(series, tiny_model_path, tmp_path):
    src = _edited(series, tmp_path / "in", lambda ds, i: None)
    before, model_before = _sha_tree(src), sha256_file(tiny_model_path)
    stats = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    assert main(["standardize", str(src), str(tmp_path / "o"), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1",
                 "--quiet"]) == 0
    assert _sha_tree(src) == before and sha256_file(tiny_model_path) == model_before
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == stats


# ------------------------------------------------------------------------------------------ determinism
def test_cpu_determinism_across_processes_and_provenance(tiny_model_path, tmp_path):
    """Same input, model, steps and seed in two separate processes: byte-identical output files."""
    src = io.write_image(_volume(3, 32, seed=7), tmp_path / "in.nrrd")
    outs = [tmp_path / "a.nrrd", tmp_path / "b.nrrd"]
    procs = [_cli("standardize", str(src), str(o), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "3", "--seed", "11",
                  "--quiet") for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()
    image = sitk.ReadImage(str(outs[0]))
    assert image.GetMetaData("LTDiffPP_model_sha256") == sha256_file(tiny_model_path)
    software = image.GetMetaData("LTDiffPP_software")
    import torch

    assert f"ltdiffpp {__import__('LTDiffPPLib').__version__}" in software and f"torch {torch.__version__}" in software
    assert "seed 11" in image.GetMetaData("LTDiffPP_sampling")
    other_seed = tmp_path / "c.nrrd"
    assert main(["standardize", str(src), str(other_seed), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "3",
                 "--seed", "12", "--quiet"]) == 0
    assert not np.array_equal(io.read_image(other_seed).hu, io.read_image(outs[0]).hu)


def test_dicom_output_records_versions_and_model_checksum(series, tiny_model_path, tmp_path):
    out = tmp_path / "std"
    assert main(["standardize", str(series), str(out), "--model", str(tiny_model_path), "--source-kernel", "B30f", "--steps", "1",
                 "--quiet"]) == 0
    ds = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
    versions = list(ds.SoftwareVersions)
    assert any(v.startswith("ltdiffpp ") for v in versions) and any(v.startswith("torch ") for v in versions)
    assert f"model_sha256: {sha256_file(tiny_model_path)}" in ds.DerivationDescription


def test_library_errors_share_one_base():
    for cls in (InputError, ModelFileError, OutputError):
        assert issubclass(cls, LTDiffPPError)
