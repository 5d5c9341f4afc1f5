"""Fuzzing of the DICOM reader: mutated headers, pixel data and raw bytes of real DICOM files.

Start from a valid series (written by ``write_dicom_series`` from a small volume, and the real GE series
of the shared data when present), mutate it with hypothesis, and read it back. The only outcomes allowed
are a valid :class:`~LTDiffPPLib.io.CTVolume` or a :class:`~LTDiffPPLib.errors.LTDiffPPError` whose message
names the folder or a file in it. Anything else (``ValueError``, ``struct.error``, ``AttributeError``, a
segfault...) is a bug of the reader.

Budget: the examples are derandomized (the same ones every run, so CI is reproducible) and bounded so
the file takes well under a minute on a 2-core CPU. For a longer, random campaign::

    LTDIFFPP_FUZZ_EXAMPLES=5000 LTDIFFPP_FUZZ_RANDOM=1 pytest tests/test_fuzz_dicom.py
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from LTDiffPPLib import io
from LTDiffPPLib.errors import LTDiffPPError

SHARED_GE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_ct" / "dcmqi_ge_standard"
EXAMPLES = int(os.environ.get("LTDIFFPP_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, deadline=None, database=None,
                    derandomize=not os.environ.get("LTDIFFPP_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# tag -> VR of the header elements the reader looks at
TAGS = {
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"), "HighBit": (0x00280102, "US"), "PixelRepresentation": (0x00280103, "US"),
    "SamplesPerPixel": (0x00280002, "US"), "PlanarConfiguration": (0x00280006, "US"),
    "PhotometricInterpretation": (0x00280004, "CS"), "NumberOfFrames": (0x00280008, "IS"),
    "RescaleIntercept": (0x00281052, "DS"), "RescaleSlope": (0x00281053, "DS"), "PixelSpacing": (0x00280030, "DS"),
    "ImagePositionPatient": (0x00200032, "DS"), "ImageOrientationPatient": (0x00200037, "DS"),
    "SliceThickness": (0x00180050, "DS"), "Modality": (0x00080060, "CS"), "SeriesInstanceUID": (0x0020000E, "UI"),
    "ConvolutionKernel": (0x00181210, "SH"), "SpecificCharacterSet": (0x00080005, "CS"),
    "PixelData": (0x7FE00010, "OW"),
}
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99", "1.2.3.4", "",
                     "junk\x00"]

_numbers = st.sampled_from(["", " ", "0", "-0", "1", "-1", "0.5", "1e-300", "1e308", "1e400", "-1e400", "nan", "NaN",
                            "inf", "-inf", "abc", "1\\2", "1\\2\\3", "1\\0\\0\\0\\1\\0", "0\\0\\0\\0\\0\\0",
                            "1\\0\\0\\1\\0\\0", "1\\1\\1\\1\\1\\1\\1", "-1024", "4096", "65536", "99999999999999999"])
_number_text = st.one_of(_numbers, st.lists(_numbers, min_size=1, max_size=7).map("\\".join),
                         st.text(alphabet="0123456789.-+eE\\ naif", max_size=24))
_ushort = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 4096, 32768, 65535])
                    .map(lambda v: v.to_bytes(2, "little")), st.binary(max_size=5))


def _value(vr: str):
    if vr == "US":
        return _ushort
    if vr in ("DS", "IS"):
        return _number_text.map(lambda s: s.encode("latin-1"))
    if vr == "OW":
        return st.one_of(st.binary(max_size=64), st.just(b""), st.integers(1, 4).map(lambda k: b"\x00" * (k * 1000)))
    return st.one_of(st.text(max_size=20).map(lambda s: s.encode("utf-8", "replace")), st.binary(max_size=20),
                     st.sampled_from([b"CT", b"MR", b"RGB", b"MONOCHROME1", b"YBR_FULL", b"PALETTE COLOR", b""]))


header_mutation = st.one_of(
    st.sampled_from(sorted(TAGS)).flatmap(lambda k: st.tuples(st.just("set"), st.just(k), _value(TAGS[k][1]))),
    st.tuples(st.just("delete"), st.sampled_from(sorted(TAGS)), st.none()),
    st.tuples(st.just("syntax"), st.sampled_from(TRANSFER_SYNTAXES), st.none()),
)
byte_mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.none()),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
)


def _apply_header(path: Path, mutations: list) -> None:
    ds = pydicom.dcmread(path)
    for kind, key, value in mutations:
        if kind == "set":
            tag, vr = TAGS[key]
            ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
        elif kind == "delete" and TAGS[key][0] in ds:
            del ds[TAGS[key][0]]
        elif kind == "syntax":
            ds.file_meta.TransferSyntaxUID = key
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path)
    except Exception:  # pydicom cannot encode this mutation (e.g. a big-endian syntax): keep the file as it was
        pass


def _apply_bytes(path: Path, mutations: list) -> None:
    data = bytearray(path.read_bytes())
    for kind, where, arg in mutations:
        at = min(len(data), int(where * len(data)))
        if kind == "flip" and at < len(data):
            data[at] ^= arg
        elif kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            data[at:at + len(arg)] = arg
        elif kind == "insert":
            data[at:at] = arg
        elif kind == "delete":
            del data[at:at + arg]
    path.write_bytes(bytes(data))


def _kind(message: str, folder: Path) -> str:
    """The error message without paths and numbers, to group outcomes in hypothesis' statistics."""
    text = re.sub(r"\S*" + re.escape(str(folder)) + r"\S*", "<path>", message)
    return re.sub(r"[-+0-9.e]+", "#", text.split(";")[0].split("(")[0])[:70]


def _check_read(folder: Path) -> None:
    """Read the folder: a valid volume or the library's own error naming the folder, nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = io.read_volume(folder)
        except LTDiffPPError as exc:
            message = str(exc)
            assert str(folder) in message, f"error does not name the folder: {exc}"
            # the reader's last-resort wrapper: an allowed type, but a path without a specific check is a finding
            assert not getattr(exc, "unanticipated", False), f"only the safety net caught this: {exc!r}"
            event(f"{type(exc).__name__}: {_kind(message, folder)}")
            return
    event("read")
    assert v.hu.ndim == 3 and v.hu.dtype == np.float32 and v.hu.size > 0
    assert np.isfinite(v.hu).all()
    assert all(np.isfinite(v.spacing)) and all(s > 0 for s in v.spacing)
    assert all(np.isfinite(v.origin)) and all(np.isfinite(v.direction))


@pytest.fixture(scope="module")
def seed_series(tmp_path_factory) -> Path:
    """A valid 3-slice series of a small synthetic volume, written by the library's own writer."""
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (3, 16, 20)).clip(-1024, 3000).astype(np.float32)
    hu[:, :2] = -1000  # some air, as a real CT has
    vol = io.CTVolume(hu=hu, spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, 30.0),
                      direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return io.write_dicom_series(vol, tmp_path_factory.mktemp("fuzz") / "seed", series_description="fuzz seed",
                                 convolution_kernel="B30f")


def _mutated_copy(src: Path, file_index: int) -> tuple[Path, Path]:
    work = Path(tempfile.mkdtemp(prefix="ltdiffpp-fuzz-"))
    folder = work / "series"
    shutil.copytree(src, folder)
    files = sorted(folder.iterdir())
    return folder, files[file_index % len(files)]


def test_seed_series_read(seed_series):
    """The unmutated seeds are valid (otherwise the fuzzer would only ever see errors)."""
    assert io.read_volume(seed_series).hu.shape == (3, 16, 20)
    if SHARED_GE.is_dir():
        assert io.read_volume(SHARED_GE).hu.shape == (3, 512, 512)


@fuzz(150)
@given(idx=st.integers(0, 2), mutations=st.lists(header_mutation, min_size=1, max_size=4))
def test_fuzz_headers(seed_series, idx, mutations):
    folder, target = _mutated_copy(seed_series, idx)
    try:
        _apply_header(target, mutations)
        _check_read(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@fuzz(150)
@given(idx=st.integers(0, 2), mutations=st.lists(byte_mutation, min_size=1, max_size=4))
def test_fuzz_bytes(seed_series, idx, mutations):
    folder, target = _mutated_copy(seed_series, idx)
    try:
        _apply_bytes(target, mutations)
        _check_read(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@fuzz(40)
@given(idx=st.integers(0, 2), headers=st.lists(header_mutation, max_size=2),
       raw=st.lists(byte_mutation, max_size=2))
def test_fuzz_real_ge_series(idx, headers, raw):
    """The same mutations on the real GE series (512², 3 slices), when the shared data is present."""
    if not SHARED_GE.is_dir():
        pytest.skip(f"shared data {SHARED_GE} is absent; the synthetic seed is fuzzed above")
    folder, target = _mutated_copy(SHARED_GE, idx)
    try:
        _apply_header(target, headers)
        _apply_bytes(target, raw)
        _check_read(folder)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
