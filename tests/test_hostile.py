"""Reliability, round 2 (issue 16): what a new user hit in hostile and unusual cases, one test per case.

Each refusal is checked the same way (:func:`_refused`): exit code 2, one line ``ltdiffpp: error: ...``
naming the file and the problem, nothing new written (not even a hidden temporary), and every input
byte-identical. docs/RELIABILITY.md tabulates the cases and their outcomes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from LTDiffPPLib import io, modelfile
from LTDiffPPLib.cli import main
from LTDiffPPLib.errors import InputError, ModelFileError, OutputError
from LTDiffPPLib.inference import standardize
from LTDiffPPLib.io.atomic import _HOST_TAG, output_lock
from LTDiffPPLib.modelfile import content_digest, embed_digest, load_model

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(n: int = 3, size: int = 32, seed: int = 0) -> io.CTVolume:
    """A small CT-like volume (z, y, x): air border, soft tissue, a bone block; 0.75 mm pixels."""
    rng = np.random.default_rng(seed)
    hu = np.full((n, size, size), -1000.0, np.float32)
    hu[:, 4:-4, 4:-4] = np.round(rng.normal(40, 20, (n, size - 8, size - 8)))
    hu[:, size // 2 - 3:size // 2 + 3, size // 2 - 3:size // 2 + 3] = 1200
    return io.CTVolume(hu=hu, spacing=(0.75, 0.75, 2.5), origin=(-12.0, -12.0, 40.0), direction=IDENTITY)


def _tree(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (hidden ones too) with the SHA-256 of files ('' for folders)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def _refused(args: list[str], capsys, root: Path, *expect: str) -> str:
    """Run the CLI; assert exit 2, one error line holding every ``expect``, and ``root`` left as it was."""
    before = _tree(root)
    rc = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("ltdiffpp: error: "), err
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert _tree(root) == before, "something was written, removed or changed"
    return lines[0]


@pytest.fixture
def tiny(tiny_model_path) -> list[str]:
    return ["--model", str(tiny_model_path), "--steps", "1", "--quiet", "--source-kernel", "B30f"]


# ------------------------------------------------------------------ 1. an output that is an input
def test_output_resolving_to_the_input_is_refused_whatever_the_flags(tmp_path, tiny, capsys):
    src = io.write_image(_volume(), tmp_path / "in.mha")
    (tmp_path / "in").mkdir()
    for out in (src, tmp_path / "in" / ".." / "in.mha", tmp_path / "." / "in.mha"):
        _refused(["standardize", str(src), str(out), *tiny, "--overwrite"], capsys, tmp_path,
                 f"Cannot write {out}: it is the input {src}")
    link = tmp_path / "link.mha"
    link.symlink_to(src)
    _refused(["standardize", str(src), str(link), *tiny, "--overwrite"], capsys, tmp_path, "it is the input")
    hard = tmp_path / "hard.mha"
    os.link(src, hard)
    _refused(["standardize", str(src), str(hard), *tiny, "--overwrite"], capsys, tmp_path, "it is the input")
    # an output folder that holds the input would be replaced, deleting it
    _refused(["standardize", str(src), str(tmp_path), *tiny, "--overwrite"], capsys, tmp_path,
             f"it holds the input {src}")
    # the model file is an input too
    model = tiny[1]
    _refused(["standardize", str(src), model, *tiny[2:], "--model", model, "--overwrite"], capsys,
             Path(model).parent, "it is the input")


def test_dicom_folder_as_its_own_output_or_holding_the_output_is_refused(tmp_path, tiny, capsys):
    series = io.write_dicom_series(_volume(), tmp_path / "series", series_description="in", convolution_kernel="B30f")
    _refused(["standardize", str(series), str(series), *tiny, "--overwrite"], capsys, tmp_path, "it is the input")
    _refused(["standardize", str(series), str(series / "out.nrrd"), *tiny], capsys, tmp_path,
             "it lies inside the input folder")
    _refused(["standardize", str(series), str(series / "sub"), *tiny], capsys, tmp_path,
             "it lies inside the input folder")
    _refused(["simulate", str(series), str(series), "--quiet"], capsys, tmp_path, "it lies inside the input folder")
    with pytest.raises(OutputError, match="it is the input"):  # the library refuses too
        v = io.read_volume(series)
        io.write_volume(v, series, overwrite=True)
    v = io.read_image(io.write_image(_volume(), tmp_path / "a.nrrd"))
    with pytest.raises(OutputError, match="it is the input"):
        io.write_image(v, tmp_path / "a.nrrd", overwrite=True)


# ------------------------------------------------------------------ 2. PixelPaddingValue
def _padded_series(tmp_path: Path, name: str, *, pad_tag: int | None, stored_pad: int = 63536,
                   limit: int | None = None) -> tuple[Path, io.CTVolume, np.ndarray]:
    """An unsigned series (air 0, water 1024; intercept −1024) whose corners outside a circular scan field
    are padding stored as ``stored_pad`` (63536: the bit pattern of −2000), with PixelPaddingValue
    ``pad_tag`` (None: absent). Returns the folder, the volume it encodes and the padding mask."""
    vol = _volume(3, 32)
    series = io.write_dicom_series(vol, tmp_path / f"{name}-src", series_description="in", convolution_kernel="B30f")
    yy, xx = np.mgrid[:32, :32]
    outside = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 > 15.5**2
    folder = tmp_path / name
    folder.mkdir()
    for f in sorted(series.iterdir()):
        ds = pydicom.dcmread(f)
        raw = (ds.pixel_array.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
        raw[outside] = stored_pad
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
        ds.RescaleIntercept = "-1024"
        ds.PixelData = raw.astype("<u2").tobytes()
        if pad_tag is not None:
            ds.add_new(0x00280120, "US", pad_tag)
        if limit is not None:
            ds.add_new(0x00280121, "US", limit)
        ds.save_as(folder / f.name)
    shutil.rmtree(series)
    mask = np.broadcast_to(outside, vol.hu.shape)
    return folder, vol, mask


@pytest.mark.parametrize("pad_tag", [63536, 2**16 - 2000], ids=["as-stored", "same-bits"])
def test_pixel_padding_becomes_air_and_the_interior_is_exact(tmp_path, pad_tag):
    folder, vol, mask = _padded_series(tmp_path, "pad", pad_tag=pad_tag)
    v = io.read_volume(folder)
    assert v.padding is not None and np.array_equal(v.padding, mask)
    assert np.all(v.hu[mask] == -1024.0)
    np.testing.assert_array_equal(v.hu[~mask], vol.hu[~mask])  # no shift of the interior


def test_pixel_padding_range_limit_marks_a_range(tmp_path):
    folder, vol, mask = _padded_series(tmp_path, "range", pad_tag=63000, stored_pad=63536, limit=64000)
    v = io.read_volume(folder)
    assert np.array_equal(v.padding, mask) and np.all(v.hu[mask] == -1024.0)
    np.testing.assert_array_equal(v.hu[~mask], vol.hu[~mask])


def test_padding_without_pixel_padding_value_is_an_error_naming_file_and_tag(tmp_path, tiny, capsys):
    folder, _, _ = _padded_series(tmp_path, "nopad", pad_tag=None)
    with pytest.raises(InputError, match=r"stored value 63536 gives 62512 HU .* lacks PixelPaddingValue \(0028,0120\)"):
        io.read_volume(folder)
    _refused(["standardize", str(folder), str(tmp_path / "o.nrrd"), *tiny], capsys, tmp_path,
             str(folder / "IM00001.dcm"), "62512 HU", "PixelPaddingValue (0028,0120)")


def test_pixel_padding_value_no_pixel_can_hold_is_an_error(tmp_path, tiny, capsys):
    folder, _, _ = _padded_series(tmp_path, "badpad", pad_tag=None)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.add_new(0x00280120, "SL", 70000)
        ds.save_as(f)
    _refused(["standardize", str(folder), str(tmp_path / "o.nrrd"), *tiny], capsys, tmp_path,
             "PixelPaddingValue (0028,0120) = 70000 is not a 16-bit unsigned pixel value")


def test_padding_stays_outside_what_the_model_changes(tmp_path, tiny, capsys):
    folder, _, mask = _padded_series(tmp_path, "conv", pad_tag=63536)
    out = tmp_path / "out.nrrd"
    assert main(["standardize", str(folder), str(out), *tiny]) == 0
    res = io.read_volume(out).hu
    assert np.all(res[mask] == -1024.0)
    # the untrained model does change air: without the mask the padding would not stay -1024 exactly
    v = io.read_volume(folder)
    raw = standardize(v.hu, v.spacing, tiny[1], device="cpu", steps=1)
    assert not np.all(raw[mask] == -1024.0)
    np.testing.assert_allclose(res[~mask], raw[~mask], atol=1e-3)


# ------------------------------------------------------------------ 3. self-verifying model files
def _tensors_and_header(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _flip_weight_byte(src: Path, dst: Path, count: int = 1) -> Path:
    data = bytearray(src.read_bytes())
    n = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    for offset in rng.choice(np.arange(8 + n, len(data)), size=count, replace=False):
        data[offset] ^= 0x40
    dst.write_bytes(bytes(data))
    return dst


def test_saved_models_carry_a_digest_that_verifies(tiny_model_path):
    computed, embedded = content_digest(tiny_model_path)
    assert embedded is not None and embedded == computed and computed.startswith("sha256:")


@pytest.mark.parametrize("damage", ["one weight byte", "1000 weight bytes", "HU normalization", "tensor name"])
def test_damaged_or_edited_model_is_refused(damage, tiny_model_path, tmp_path, tiny, capsys):
    bad = tmp_path / "models" / "bad.safetensors"
    bad.parent.mkdir()
    if damage == "one weight byte":
        _flip_weight_byte(tiny_model_path, bad)
    elif damage == "1000 weight bytes":
        _flip_weight_byte(tiny_model_path, bad, 1000)
    else:
        tensors, header = _tensors_and_header(tiny_model_path)
        if damage == "HU normalization":
            meta = json.loads(header["ltdiffpp"])
            meta["hu"]["center"] += 50
            header["ltdiffpp"] = json.dumps(meta)
        else:
            name = next(k for k in tensors if k.endswith("norm2.bias"))
            tensors[name.replace("norm2", "norl2")] = tensors.pop(name)
        save_file(tensors, str(bad), metadata=header)  # the old digest is kept: it no longer matches
    with pytest.raises(ModelFileError, match="the file is damaged or was modified"):
        load_model(bad)
    src = io.write_image(_volume(), tmp_path / "in.nrrd")
    args = [a if a != tiny[1] else str(bad) for a in tiny]
    _refused(["standardize", str(src), str(tmp_path / "o.nrrd"), *args], capsys, tmp_path,
             str(bad), "the file is damaged or was modified")
    _refused(["info", str(bad)], capsys, tmp_path, "the file is damaged or was modified")


def test_renamed_tensor_in_a_file_without_digest_says_damaged_not_pytorch(tiny_model_path, tmp_path):
    tensors, header = _tensors_and_header(tiny_model_path)
    header.pop(modelfile.DIGEST_KEY)
    name = next(k for k in tensors if k.endswith("norm2.bias"))
    tensors[name.replace("norm2", "norl2")] = tensors.pop(name)
    bad = tmp_path / "old.safetensors"
    save_file(tensors, str(bad), metadata=header)
    with pytest.warns(UserWarning, match="carries no embedded digest"), \
            pytest.raises(ModelFileError, match=r"the file is damaged .*\(tensors: 1 missing, e\.g\. [\w.]*norm2\.bias; "
                                                r"1 unexpected, e\.g\. [\w.]*norl2\.bias\)") as exc:
        load_model(bad)
    assert "\n" not in str(exc.value) and "Missing key" not in str(exc.value)


def test_copy_claiming_a_registered_name_must_be_that_model(tmp_path, tiny, capsys):
    shipped = modelfile.registry()[0][0]
    tensors, header = _tensors_and_header(shipped.path)
    meta = json.loads(header["ltdiffpp"])
    assert meta["name"] == shipped.name
    meta["hu"]["scale"] *= 1.01  # an edit, with the digest dropped (or a file from before digests)
    header["ltdiffpp"] = json.dumps(meta)
    header.pop(modelfile.DIGEST_KEY, None)
    fake = tmp_path / "m" / "copy.safetensors"
    fake.parent.mkdir()
    save_file(tensors, str(fake), metadata=header)
    with pytest.raises(ModelFileError, match=f"calls itself the registered model '{shipped.name}' but is not its file"):
        load_model(fake)
    _refused(["info", str(fake)], capsys, tmp_path, "calls itself the registered model")
    exact = tmp_path / "m" / "exact.safetensors"  # an unmodified copy of the shipped file is fine
    shutil.copyfile(shipped.path, exact)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_model(exact).metadata["name"] == shipped.name


def test_shipped_models_load_without_warnings_by_name_and_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for e in modelfile.registry()[0]:
            assert load_model(e.name).sha256 == e.sha256
            assert load_model(e.path).sha256 == e.sha256


def test_file_without_digest_loads_with_a_warning_and_embed_digest_fixes_it(tiny_model_path, tmp_path):
    tensors, header = _tensors_and_header(tiny_model_path)
    header.pop(modelfile.DIGEST_KEY)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=header)
    with pytest.warns(UserWarning, match="carries no embedded digest"):
        load_model(old)
    embed_digest(old)
    computed, embedded = content_digest(old)
    assert embedded == computed == content_digest(tiny_model_path)[0]  # same weights and metadata, same digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(old)


# ------------------------------------------------------------------ 4. numeric options out of range
@pytest.mark.parametrize("command, option, value", [
    ("standardize", "--seed", "18446744073709551616"), ("standardize", "--seed", "-1"),
    ("standardize", "--steps", "100000"), ("standardize", "--steps", "0"), ("standardize", "--batch-size", "0"),
    ("standardize", "--ensemble", "1000"), ("standardize", "--steps", "ten"),
    ("simulate", "--dose", "0"), ("simulate", "--dose", "nan"), ("simulate", "--views", "5"),
    ("simulate", "--thickness", "-2"), ("simulate", "--workers", "0"), ("simulate", "--seed", "1e30"),
    ("build-dataset", "--val", "1.5"), ("build-dataset", "--phantoms", "-3"),
    ("evaluate", "--rois", "0"), ("evaluate", "--roi-size", "100000"),
])
def test_numeric_options_out_of_range_give_one_line(command, option, value, tmp_path, tiny_model_path, capsys):
    src = io.write_image(_volume(), tmp_path / "in.nrrd")
    args = {"standardize": ["standardize", str(src), str(tmp_path / "o.nrrd"), "--model", str(tiny_model_path),
                            "--source-kernel", "B30f"],
            "simulate": ["simulate", str(src), str(tmp_path / "sim")],
            "build-dataset": ["build-dataset", str(tmp_path / "ds"), "--phantoms", "1"],
            "evaluate": ["evaluate", "--reference", str(src), "--candidate", f"a={src}", "--out", str(tmp_path / "ev")]}
    line = _refused([*args[command], f"{option}={value}"], capsys, tmp_path, f"argument {option}", repr(value))
    assert "expected a" in line and "from" in line


def test_library_bounds_seed_and_steps(tiny_model):
    hu = _volume(1, 16).hu
    with pytest.raises(InputError, match="seed must be a whole number from 0 to 4294967295, got 18446744073709551616"):
        standardize(hu, None, tiny_model, device="cpu", steps=1, seed=2**64)
    with pytest.raises(InputError, match="steps must be a whole number from 1 to 1000, got 100000"):
        standardize(hu, None, tiny_model, device="cpu", steps=100000)


# ------------------------------------------------------------------ 5. messages
def _full_disk(tmp_path: Path) -> Path:
    """A 256 KiB tmpfs (needs root and mount rights; else the test is skipped with the reason)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip()})")
    return mnt


@pytest.mark.parametrize("name", ["out", "out.nrrd", "out.nii", "out.nii.gz", "out.mha", "out.mhd", "out.nhdr"])
def test_full_disk_says_no_space_left_and_leaves_nothing(name, tmp_path, tiny, capsys):
    noise = np.random.default_rng(0).normal(0, 300, (4, 256, 256)).astype(np.float32)  # incompressible
    src = io.write_image(_volume(4, 256).with_hu(noise), tmp_path / "in.nrrd")  # 1 MiB: more than the disk holds
    mnt = _full_disk(tmp_path)
    try:
        with pytest.raises(OutputError, match=r"no space left on device") as exc:
            io.write_volume(io.read_volume(src), mnt / name)
        assert str(mnt / name) in str(exc.value) and "\n" not in str(exc.value)
        assert list(mnt.iterdir()) == []
        _refused(["standardize", str(src), str(mnt / name), *tiny], capsys, mnt, "no space left on device", name)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)  # lazy: a test failure must not leave it mounted


def test_empty_file_and_content_of_another_format(tmp_path, tiny, capsys):
    empty = tmp_path / "empty.mha"
    empty.touch()
    _refused(["standardize", str(empty), str(tmp_path / "o.nrrd"), *tiny], capsys, tmp_path,
             f"{empty} is an empty file (0 bytes)")
    nrrd = io.write_image(_volume(), tmp_path / "a.nrrd")
    as_mha = tmp_path / "really-nrrd.mha"
    shutil.copyfile(nrrd, as_mha)
    _refused(["standardize", str(as_mha), str(tmp_path / "o.nrrd"), *tiny], capsys, tmp_path,
             f"{as_mha}: the content is a NRRD file, but the name ends in .mha", "rename it to end in .nrrd")
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image at all\n")
    _refused(["standardize", str(text), str(tmp_path / "o.nrrd"), *tiny], capsys, tmp_path,
             "the content is not a gzip-compressed NIfTI image")


def test_info_on_a_folder(tmp_path, capsys):
    _refused(["info", str(tmp_path)], capsys, tmp_path, f"{tmp_path} is a folder, not a model file")


def test_cli_warnings_are_one_line_and_keep_their_category(tmp_path, tiny, capsys):
    v = _volume()
    raw = v.with_hu(v.hu + 1024)  # raw unsigned values: the reader warns, the domain guard refuses
    src = io.write_image(raw, tmp_path / "raw.nrrd")
    assert main(["standardize", str(src), str(tmp_path / "o.nrrd"), *tiny]) == 2
    assert "not Hounsfield units" in capsys.readouterr().err
    # the command as a user runs it: every warning on one line of stderr, converted anyway with --force
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "LTDiffPPLib.cli", "standardize", str(src), str(tmp_path / "o.nrrd"),
                        *tiny, "--force"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 2 and all(ln.startswith("ltdiffpp: warning: ") for ln in lines), p.stderr
    assert "raw unsigned" in p.stderr and "converted despite" in p.stderr
    assert "UserWarning" not in p.stderr and ".py:" not in p.stderr
    # in-process, whoever records warnings gets them with their category (the CLI only changes their text)
    with pytest.warns(UserWarning, match="raw unsigned"):
        assert main(["standardize", str(src), str(tmp_path / "o2.nrrd"), *tiny, "--force"]) == 0
    with pytest.warns(UserWarning, match="raw unsigned"):  # the library warns with its category
        io.read_volume(src)


# ------------------------------------------------------------------ 6. surprises
@pytest.mark.parametrize("name", ["result.png", "result.tif", "result.jpg", "slice.dcm"])
def test_output_extensions_that_cannot_hold_hu_are_refused(name, tmp_path, tiny, capsys):
    src = io.write_image(_volume(), tmp_path / "in.nrrd")
    line = _refused(["standardize", str(src), str(tmp_path / name), *tiny], capsys, tmp_path, name)
    assert ("cannot hold Hounsfield units" in line and ".nrrd, .nhdr, .nii, .nii.gz, .mha, .mhd" in line) or \
        "DICOM output is a folder" in line
    with pytest.raises(OutputError):
        io.write_volume(io.read_volume(src), tmp_path / name)


def test_simulate_leaves_nothing_when_it_fails(tmp_path, capsys):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ngarbage")
    _refused(["simulate", str(bad), str(tmp_path / "new" / "deeper"), "--quiet"], capsys, tmp_path, str(bad))
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    _refused(["simulate", str(bad), str(existing), "--quiet"], capsys, tmp_path, str(bad))


def test_second_run_on_the_same_output_is_refused_before_the_work(tmp_path, tiny, capsys, monkeypatch):
    src = io.write_image(_volume(), tmp_path / "in.nrrd")
    out = tmp_path / "out.nrrd"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom LTDiffPPLib.io.atomic import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        import LTDiffPPLib.cli as cli

        def no_work(*a, **k):
            raise AssertionError("the model was loaded before the output was checked")

        monkeypatch.setattr(cli, "load_model", no_work)
        before = _tree(tmp_path)
        assert main(["standardize", str(src), str(out), *tiny]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ltdiffpp: error: Cannot write {out}: another run is writing it now") and "\n" == err[-1]
        assert _tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.undo()
    assert main(["standardize", str(src), str(out), *tiny]) == 0  # the dead holder's lock does not block
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nrrd", "out.nrrd"]  # its lock file is gone too


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_swept_from_the_folder(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".other.nrrd.tmp-{_HOST_TAG}-{dead}-0123abcd.nrrd"
    stale_dir = tmp_path / f".series.tmp-{_HOST_TAG}-{dead}-89abcdef"
    live = tmp_path / f".third.nrrd.tmp-{_HOST_TAG}-{alive}-0123abcd.nrrd"
    foreign = tmp_path / f".fourth.nrrd.tmp-ffffff-{dead}-0123abcd.nrrd"
    stale_lock = tmp_path / ".gone.nrrd.ltdiffpp-lock"
    for p in (stale_file, live, foreign, stale_lock):
        p.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "IM00001.dcm").write_bytes(b"partial")
    with output_lock(tmp_path / "held.nrrd"):  # a live run's lock stays
        io.write_image(_volume(), tmp_path / "new.nrrd")
        assert (tmp_path / ".held.nrrd.ltdiffpp-lock").exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["new.nrrd", live.name, foreign.name]), names


# ------------------------------------------------------------------ 7. DICOM conformance (dciodvfy)
def _dciodvfy_errors(path: Path) -> set[str]:
    p = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("Error")}


@pytest.fixture(scope="module")
def dciodvfy() -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed; `make` installs it where it runs as root")


@pytest.mark.parametrize("name", ["dcmqi_ge_standard", "itkelastix_philips_C", "totalsegmentator_siemens_Br38f"])
def test_dicom_output_has_no_dciodvfy_error_the_input_lacks(name, dciodvfy, shared_data, tmp_path):
    src = shared_data / "chest_ct" / name
    first = sorted(src.iterdir())[0]
    header = pydicom.dcmread(first, stop_before_pixels=True)
    vol = io.read_volume(src)
    vol = io.CTVolume(hu=vol.hu[:2], spacing=vol.spacing, origin=vol.origin, direction=vol.direction,
                      dicom_header=header, source=vol.source)  # two slices are enough for the header checks
    out = io.write_dicom_series(vol, tmp_path / "out", series_description="LTDiffPP B30f->B70f",
                                convolution_kernel="B70f", provenance={"model_sha256": "0" * 64})
    input_errors = _dciodvfy_errors(first)
    for f in sorted(out.iterdir()):
        new = _dciodvfy_errors(f) - input_errors
        assert not new, f"{f.name}: {sorted(new)}"
    ds = pydicom.dcmread(out / "IM00001.dcm", stop_before_pixels=True)
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]


def test_cli_dicom_output_conforms_and_its_description_fits(dciodvfy, tmp_path, tiny_model_path, capsys):
    src = io.write_image(_volume(), tmp_path / "in.nrrd")  # no DICOM header at all: nothing to excuse errors
    out = tmp_path / "out"
    assert main(["standardize", str(src), str(out), "--model", "ltdiffpp-b30f-b70f", "--steps", "1", "--quiet",
                 "--source-kernel", "B30f"]) == 0
    assert capsys.readouterr().err == ""  # no truncation warning
    for f in sorted(out.iterdir()):
        assert _dciodvfy_errors(f) == set(), f.name
    ds = pydicom.dcmread(out / "IM00001.dcm", stop_before_pixels=True)
    assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.startswith("LTDiffPP B30f->B70f ltdiffpp-b30f-b70f")
    assert "ltdiffpp-b30f-b70f" in ds.DerivationDescription and "seed" in ds.DerivationDescription


# ------------------------------------------------------------------ 8. a quiet install
def test_package_data_is_declared_so_setuptools_is_quiet(tmp_path):
    """Build the wheel as `pip install` does (with the venv's setuptools): no "Package would be ignored"
    warning, and the wheel holds the model files and the io package."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, src / name)
    for name in ("LTDiffPPLib", "Training"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300, env=env,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    text = p.stdout + p.stderr
    assert "would be ignored" not in text and "absent from the `packages` configuration" not in text, text[-3000:]
    import zipfile

    wheel = next(tmp_path.glob("ltdiffpp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for e in modelfile.registry()[0]:
        assert f"LTDiffPPLib/resources/models/{e.file}" in names
    assert {"LTDiffPPLib/io/__init__.py", "LTDiffPPLib/io/dicom_write.py", "LTDiffPPLib/resources/registry.json",
            "Training/configs/default.json"} <= names
