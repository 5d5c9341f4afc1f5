"""The worker-process runner (LTDiffPPLib.runner): real subprocesses, real progress protocol, real
kills. The standardize worker runs a tiny untrained model (tests/conftest.py) on a small volume."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_torch

from LTDiffPPLib.errors import InputError
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.phantom import qa_phantom
from LTDiffPPLib.runner import (
    CANCELLED,
    DONE,
    FAILED,
    PREFIX,
    RUNNING,
    Job,
    JobError,
    StandardizeJob,
    missing_requirements,
    parse_requirements,
    python_executable,
)


def _standardize(*args, **kwargs):
    """``LTDiffPPLib.inference.standardize``, imported on use: it needs torch, which the Python 3.12
    GUI-side run of these tests does not have (the tests that call it skip there)."""
    from LTDiffPPLib.inference import standardize

    return standardize(*args, **kwargs)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _script_job(tmp_path: Path, code: str, **kwargs) -> Job:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(code))
    return Job([str(script)], python=sys.executable, title="Test job", **kwargs)


@pytest.fixture
def volume() -> CTVolume:
    return CTVolume(hu=qa_phantom((3, 32, 40), spacing_mm=6.0, seed=4), spacing=(0.7, 0.75, 2.5),
                    origin=(-10.0, 20.0, 30.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))


def test_standardize_job_matches_the_in_process_result(volume, tiny_model, tiny_model_path):
    job = StandardizeJob(volume, tiny_model, source_kernel="B30f", steps=2, seed=1, device="cpu")  # a LoadedModel: its file is used
    assert job.state == "not started" and (job.workdir / "input.nrrd").is_file()
    updates = []
    result = job.wait(timeout=300, progress=lambda fraction, message: updates.append((fraction, message)))
    fractions = [f for f, _ in updates]  # what the caller saw when polling (events may coalesce)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    reported = [e["done"] / e["total"] for e in job.events if e["event"] == "progress"]  # what the worker said
    assert reported == sorted(reported) and reported[0] == 0.0 and reported[-1] == 1.0
    assert any(0 < f < 1 for f in reported)  # 2 sampling steps: halfway is reported
    assert any("Standardizing 3 slices on cpu" in e.get("message", "") for e in job.events)
    assert result["steps"] == 2 and result["seed"] == 1 and result["model"]["sha256"] == tiny_model.sha256
    assert "B30f -> B70f" in result["description"] and "tiny-test" in result["description"]
    out = job.output_volume()
    assert not job.workdir.exists()  # temporary files gone once the result is read
    np.testing.assert_array_equal(out.hu, _standardize(volume.hu, volume.spacing, tiny_model, steps=2, seed=1,
                                                      device="cpu"))
    assert out.spacing == volume.spacing and out.origin == volume.origin and out.direction == volume.direction


def test_cancel_mid_run_stops_the_worker_and_leaves_nothing(tiny_model_path):
    big = CTVolume(hu=qa_phantom((24, 64, 64), spacing_mm=3.0, seed=1), spacing=(0.7, 0.7, 2.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    job = StandardizeJob(big, str(tiny_model_path), source_kernel="B30f", steps=50, device="cpu").start()
    deadline = time.monotonic() + 120
    while job.poll() == RUNNING and job.progress == 0.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.state == RUNNING and 0 < job.progress < 1, job.error
    pid = job.pid
    job.cancel()
    assert job.state == CANCELLED and not _alive(pid)
    assert not job.workdir.exists() and not job.output_path.exists()
    with pytest.raises(JobError, match="cancelled") as info:
        job.output_volume()
    assert info.value.kind == "Cancelled"


def test_cancel_kills_the_workers_children(tmp_path):
    """A worker that started its own child processes (as feature extraction does): cancel kills all."""
    job = _script_job(tmp_path, f"""
        import json, subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) for _ in range(2)]
        print({PREFIX!r} + json.dumps({{"event": "log", "message": " ".join(str(k.pid) for k in kids)}}), flush=True)
        for i in range(1000):
            print({PREFIX!r} + json.dumps({{"event": "progress", "done": i, "total": 1000}}), flush=True)
            time.sleep(0.2)
    """).start()
    deadline = time.monotonic() + 60
    while job.poll() == RUNNING and not job.log and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [int(p) for p in job.log[0].split()]
    assert len(children) == 2 and all(_alive(p) for p in children)
    job.cancel()
    deadline = time.monotonic() + 10  # orphans are reaped by init shortly after the kill
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in children + [job.pid])
    assert job.state == CANCELLED


def test_progress_protocol_and_stray_output(tmp_path):
    job = _script_job(tmp_path, f"""
        import json, time
        def emit(**e):
            print({PREFIX!r} + json.dumps(e), flush=True)
            time.sleep(0.5)  # the parent samples the state every 50 ms
        print("a library chatting on stdout")
        emit(event="progress", done=1, total=4, message="quarter")
        print({PREFIX!r} + "{{not json")
        emit(event="progress", done=3, total=4)
        emit(event="done", answer=42, message="all good")
    """)
    seen = []
    result = job.wait(timeout=60, progress=lambda f, m: seen.append((f, m)))
    assert result["answer"] == 42 and job.state == DONE and job.message == "all good"
    assert (0.25, "quarter") in seen and (0.75, "quarter") in seen and seen[-1] == (1.0, "all good")
    assert "a library chatting on stdout" in job.log and any("not json" in line for line in job.log)


def test_worker_error_event_and_silent_death_give_clear_errors(tmp_path):
    job = _script_job(tmp_path, f"""
        import json, sys
        print({PREFIX!r} + json.dumps({{"event": "error", "kind": "InputError", "message": "volume x.nrrd is empty"}}))
        sys.exit(2)
    """)
    with pytest.raises(JobError, match="volume x.nrrd is empty") as info:
        job.wait(timeout=60)
    assert info.value.kind == "InputError" and job.state == FAILED and job.returncode == 2

    job = _script_job(tmp_path, """
        import sys
        print("segfault-like crash in native code", file=sys.stderr)
        sys.exit(7)
    """)
    with pytest.raises(JobError, match="status 7") as info:
        job.wait(timeout=60)
    assert "segfault-like crash" in str(info.value) and info.value.kind == "WorkerDied"

    job = _script_job(tmp_path, f"""
        import json
        print({PREFIX!r} + json.dumps({{"event": "done"}}))
        raise SystemExit(1)
    """)
    with pytest.raises(JobError, match="status 1"):  # a result without exit status 0 is not a result
        job.wait(timeout=60)


def test_timeout_cancels(tmp_path):
    job = _script_job(tmp_path, "import time; time.sleep(300)\n")
    with pytest.raises(JobError, match="timed out") as info:
        job.wait(timeout=1.0)
    assert info.value.kind == "Timeout" and job.state == CANCELLED and not _alive(job.pid)


@requires_torch
def test_bad_model_file_fails_with_the_library_message(volume, tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"\x80\x04 a pickle pretending to be safetensors")
    job = StandardizeJob(volume, str(bogus), source_kernel="B30f", steps=2, device="cpu")
    with pytest.raises(JobError, match="pickle") as info:
        job.wait(timeout=120)
    assert info.value.kind == "ModelFileError" and not job.workdir.exists()


def test_worker_exits_when_its_parent_goes_away(volume, tiny_model_path):
    """The worker watches its stdin: closing it (the parent died) ends the worker."""
    job = StandardizeJob(volume, str(tiny_model_path), source_kernel="B30f", steps=500, device="cpu").start()
    deadline = time.monotonic() + 120
    while job.poll() == RUNNING and not job.message.startswith("Standardizing") and time.monotonic() < deadline:
        time.sleep(0.05)
    job._proc.stdin.close()
    assert job._proc.wait(timeout=30) == 3
    job.cleanup()


def test_requirements_check(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1.0  # inline\nnumpy<1.0\nsurely-not-installed-ltdiffpp-xyz>=1\n-r other.txt\n\n")
    assert [n for n, _ in parse_requirements(req)] == ["numpy", "numpy", "surely-not-installed-ltdiffpp-xyz"]
    assert missing_requirements(req) == ["numpy<1.0", "surely-not-installed-ltdiffpp-xyz>=1"]


def test_shipped_requirements_file_is_satisfied_here():
    """The module's Resources/requirements.txt lists what the worker imports; this venv has it all."""
    req = Path(__file__).resolve().parents[1] / "LTDiffPP" / "Resources" / "requirements.txt"
    names = {n.lower() for n, _ in parse_requirements(req)}
    assert {"safetensors", "pydicom", "pandas", "scipy"} <= names and "torch" not in names
    assert missing_requirements(req) == []


def test_python_executable(monkeypatch, tmp_path):
    assert python_executable() == sys.executable
    monkeypatch.setenv("LTDIFFPP_PYTHON", "/opt/x/python")
    assert python_executable() == "/opt/x/python"
    monkeypatch.delenv("LTDIFFPP_PYTHON")
    # inside Slicer, sys.executable is the application; the worker must run with PythonSlicer beside it
    bindir = tmp_path / "Slicer" / "bin"
    bindir.mkdir(parents=True)
    app, pythonslicer = bindir / "SlicerApp-real", bindir / "PythonSlicer"
    app.write_text("")
    monkeypatch.setattr(sys, "executable", str(app))
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert python_executable() == str(app)  # no PythonSlicer found: nothing better to offer
    pythonslicer.write_text("")
    assert python_executable() == str(pythonslicer)


def test_model_summary_without_torch(tiny_model_path, tmp_path):
    """The GUI lists and describes models without importing torch (it may not be installed yet)."""
    import json
    import subprocess

    code = ("import json, sys; from LTDiffPPLib.runner import model_summary, list_models; "
            f"print(json.dumps([model_summary({str(tiny_model_path)!r}), list_models()])); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    summary, (entries, _default) = json.loads(out[0])
    assert out[1] == "False"
    assert summary["name"] == "tiny-test" and summary["source_kernel"] == "B30f" and summary["target_kernel"] == "B70f"
    assert summary["untrained"] is True and summary["registered"] is False and summary["steps"] == 10
    assert isinstance(entries, list)
    bogus = tmp_path / "x.safetensors"
    bogus.write_bytes(b"\x80\x04 pickle")
    from LTDiffPPLib.errors import ModelFileError
    from LTDiffPPLib.runner import model_summary

    with pytest.raises(ModelFileError, match="not an LTDiffPP model file"):
        model_summary(bogus)
    with pytest.raises(ModelFileError, match="not found"):
        model_summary(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------- warnings, logging, pipes
def test_worker_warnings_reach_job_warnings_and_the_log(tiny_model_path, caplog):
    """A 2.0 mm volume through a model trained on 0.5-1.0 mm pixels: the in-process call warns (the domain
    guard resamples it); the same call in the worker must warn the caller too (Job.warnings, and the
    application log). The warnings name the input, which the worker reads from a temporary file."""
    import logging
    import warnings

    from LTDiffPPLib.guard import DomainWarning
    from LTDiffPPLib.inference import standardize_volume

    coarse = CTVolume(hu=qa_phantom((1, 32, 32), spacing_mm=6.0, seed=2), spacing=(2.0, 2.0, 2.5),
                      origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0), source="coarse")
    from LTDiffPPLib.modelfile import load_model

    with warnings.catch_warnings(record=True) as in_process:
        warnings.simplefilter("always")
        standardize_volume(coarse, source_kernel="B30f", model=load_model(tiny_model_path), steps=1, device="cpu")
    expected = [str(w.message).removeprefix("coarse: ") for w in in_process if w.category is DomainWarning]
    assert expected and "resampled to 1 mm" in expected[0], "the in-process call should warn (the oracle)"
    caplog.set_level(logging.INFO, logger="LTDiffPPLib.runner")
    job = StandardizeJob(coarse, str(tiny_model_path), source_kernel="B30f", steps=1, device="cpu")
    job.wait(timeout=300)
    assert job.state == DONE
    assert job.warnings == [f"coarse: {w}" for w in expected]  # the same text, as a list of strings
    logged = [r for r in caplog.records if r.name == "LTDiffPPLib.runner" and r.levelno == logging.WARNING]
    assert any(expected[0] in r.getMessage() for r in logged)
    assert any("Standardizing 1 slices" in r.getMessage() for r in caplog.records)  # worker output is logged


def test_every_warning_and_warning_log_record_is_forwarded(tmp_path, caplog):
    """The worker's hook (not only the library's own warnings): Python warnings of any module and
    WARNING log records become ``warning`` events; the job's stdout pipe is closed at the end."""
    import logging

    caplog.set_level(logging.INFO, logger="LTDiffPPLib.runner")
    job = _script_job(tmp_path, f"""
        import json, logging, warnings
        from LTDiffPPLib.runner import _forward_warnings
        _forward_warnings()
        warnings.warn("first: a UserWarning")
        logging.getLogger("somelibrary").warning("second: %s", "a log record")
        logging.getLogger("somelibrary").info("not a warning")
        print({PREFIX!r} + json.dumps({{"event": "done"}}), flush=True)
    """)
    job.wait(timeout=60)
    assert job.warnings == ["first: a UserWarning", "second: a log record"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "Test job: first: a UserWarning", "Test job: second: a log record"]
    assert job._proc.stdout.closed  # the parent's end of the pipe does not leak


def test_worker_errors_use_the_panels_words_not_the_clis(volume, tiny_model_path):
    """The library says 'use --device cpu or auto' (for the CLI); in Slicer that advice is meaningless."""
    from LTDiffPPLib.runner import panel_wording

    assert panel_wording("no CUDA GPU; use --device cpu or auto") == "no CUDA GPU; choose the device 'cpu' or 'auto'"
    assert panel_wording("lists none); pass a model file with --model PATH") == (
        "lists none); load a model file (Load from file...)")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: asking for one does not fail here")
    job = StandardizeJob(volume, str(tiny_model_path), source_kernel="B30f", steps=1, device="cuda")
    with pytest.raises(JobError) as info:
        job.wait(timeout=120)
    assert "--device" not in str(info.value) and "choose the device 'cpu'" in str(info.value)


# ------------------------------------------------------------------------------------- temporaries
def test_temporary_input_is_int16_and_compressed_when_the_hu_are_integer(volume, tmp_path):
    import SimpleITK as sitk

    from LTDiffPPLib.runner import integer_hu

    whole = volume.with_hu(np.rint(volume.hu))
    job = StandardizeJob(whole, "unused-model", workdir=tmp_path / "job")  # not started: only the input is written
    image = sitk.ReadImage(str(job.workdir / "input.nrrd"))
    assert image.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), whole.hu)
    assert image.GetSpacing() == pytest.approx(whole.spacing) and image.GetOrigin() == pytest.approx(whole.origin)
    assert (job.workdir / "input.nrrd").stat().st_size < whole.hu.size * 2  # compressed
    assert job.workdir == tmp_path / "job"
    job.cancel()
    assert not (tmp_path / "job").exists()  # a given folder is taken over and deleted
    fractional = StandardizeJob(volume.with_hu(volume.hu + 0.25), "unused-model")
    assert sitk.ReadImage(str(fractional.workdir / "input.nrrd")).GetPixelID() == sitk.sitkFloat32
    fractional.cancel()
    assert integer_hu(np.array([[[-32768.0, 32767.0]]])) and not integer_hu(np.array([[[40000.0]]]))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(InputError, match="must be empty"):
        StandardizeJob(whole, "unused-model", workdir=tmp_path / "busy")
    assert (tmp_path / "busy" / "x").exists()  # a caller's folder is never emptied


# ------------------------------------------------------------------- requirements, torch, Windows
def _fake_dist(site: Path, folder: str, name: str, version: str) -> None:
    """An installed distribution as pip leaves it: a metadata folder whose METADATA names it."""
    d = site / folder
    d.mkdir(parents=True)
    meta = "PKG-INFO" if folder.endswith(".egg-info") else "METADATA"
    (d / meta).write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.mark.parametrize("folder, name", [
    ("ruamel.yaml-0.18.6.dist-info", "ruamel.yaml"),  # the spelling of older pips
    ("ruamel_yaml-0.18.6.dist-info", "ruamel.yaml"),  # the normalized spelling of newer pips/uv
    ("Ruamel_Yaml-0.18.6.dist-info", "Ruamel.YAML"),  # case differences
    ("ruamel.yaml-0.18.6-py3.12.egg-info", "ruamel.yaml"),  # a setuptools (egg) install
])
def test_requirement_check_across_dist_info_spellings(tmp_path, folder, name):
    from LTDiffPPLib.runner import canonical_name, installed_versions

    site = tmp_path / "site-packages"
    _fake_dist(site, folder, name, "0.18.6")
    _fake_dist(site, "Py_Dicom-2.4.4.dist-info", "pydicom", "2.4.4")
    req = tmp_path / "requirements.txt"
    req.write_text("ruamel.yaml>=0.17,<1\nruamel_yaml>=0.17\nRUAMEL-YAML\npydicom>=2.4,<4\nPyDicom>=3\n")
    assert installed_versions([site]) == {"ruamel-yaml": "0.18.6", "pydicom": "2.4.4"}
    assert missing_requirements(req, paths=[site]) == ["PyDicom>=3"]  # only the real version miss
    assert canonical_name("ruamel.yaml") == canonical_name("Ruamel_YAML") == "ruamel-yaml"
    req.write_text("ruamel.yaml>=0.19\nsafetensors>=0.4\n")
    assert missing_requirements(req, paths=[site]) == ["ruamel.yaml>=0.19", "safetensors>=0.4"]


def test_torch_version_is_checked_from_metadata_without_importing_it(tmp_path):
    from LTDiffPPLib.runner import torch_problem

    site = tmp_path / "site"
    assert torch_problem(">=2.4", paths=[site]) == "missing"
    _fake_dist(site, "torch-2.1.0+cpu.dist-info", "torch", "2.1.0+cpu")
    assert torch_problem(">=2.4", paths=[site]) == "PyTorch 2.1.0+cpu is installed, but LTDiffPP needs torch>=2.4"
    other = tmp_path / "site2"
    _fake_dist(other, "torch-2.13.0.dist-info", "torch", "2.13.0")
    assert torch_problem(">=2.4", paths=[other]) is None
    code = ("import sys; from LTDiffPPLib.runner import torch_problem, missing_requirements; "
            "torch_problem(); print('torch' in sys.modules)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_worker_launch_hides_its_window_on_windows(monkeypatch):
    """The Windows branch cannot run here (no Windows): ``subprocess.STARTUPINFO`` exists only on
    Windows, so a stand-in with its two fields replaces it; the flags are Windows' own values."""
    import subprocess

    from LTDiffPPLib.runner import popen_platform_kwargs

    assert popen_platform_kwargs("posix") == {"start_new_session": True}

    class StartupInfo:  # the fields of subprocess.STARTUPINFO that matter here
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1  # SW_SHOWNORMAL, Windows' default

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    kwargs = popen_platform_kwargs("nt")
    assert kwargs["startupinfo"].dwFlags & 0x1  # STARTF_USESHOWWINDOW
    assert kwargs["startupinfo"].wShowWindow == 0  # SW_HIDE, as slicer.util.launchConsoleProcess sets it
    assert kwargs["creationflags"] & 0x08000000  # CREATE_NO_WINDOW: no console for PythonSlicer.exe
    assert kwargs["creationflags"] & 0x00000200  # CREATE_NEW_PROCESS_GROUP: cancel reaches the tree
    assert "start_new_session" not in kwargs


# -------------------------------------------------------------------------------------- sample data
def test_sample_job_makes_the_phantom_once_and_then_reads_the_cache(tmp_path):
    import SimpleITK as sitk

    from LTDiffPPLib.runner import SampleJob
    from LTDiffPPLib.sampledata import sample_kernels

    assert sample_kernels() == ["B30f", "B70f", "B50f"]  # every kernel of the shipped models
    job = SampleJob(tmp_path / "cache", shape=(1, 256, 256), workers=1)  # 1.4 mm pixels
    job.wait(timeout=300)
    files = job.files()
    assert sorted(files) == ["ChestPhantom_B30f", "ChestPhantom_B50f", "ChestPhantom_B70f", "ChestPhantom_tissues"]
    images = {k: sitk.ReadImage(str(p)) for k, p in files.items()}
    assert all(im.GetPixelID() == sitk.sitkInt16 for k, im in images.items() if "tissues" not in k)
    assert images["ChestPhantom_tissues"].GetPixelID() == sitk.sitkUInt8
    hu = {k: sitk.GetArrayFromImage(im).astype(np.float64) for k, im in images.items()}

    def high_frequency(a):  # a sharper kernel keeps more fine detail and noise
        return np.abs(np.diff(a, axis=2)).mean()

    assert high_frequency(hu["ChestPhantom_B30f"]) < high_frequency(hu["ChestPhantom_B50f"]) < high_frequency(
        hu["ChestPhantom_B70f"])
    stamps = {k: p.stat().st_mtime_ns for k, p in files.items()}
    again = SampleJob(tmp_path / "cache", shape=(1, 256, 256), workers=1)
    again.wait(timeout=120)
    assert again.files() == files and {k: p.stat().st_mtime_ns for k, p in files.items()} == stamps
    assert any("cached" in line for line in again.log)
