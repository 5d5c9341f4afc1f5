"""The worker-process runner (LTDiffPPLib.runner): real subprocesses, real progress protocol, real
kills. The standardize worker runs a tiny untrained model (tests/conftest.py) on a small volume."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from LTDiffPPLib.inference import standardize
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
    job = StandardizeJob(volume, tiny_model, steps=2, seed=1, device="cpu")  # a LoadedModel: its file is used
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
    np.testing.assert_array_equal(out.hu, standardize(volume.hu, volume.spacing, tiny_model, steps=2, seed=1,
                                                      device="cpu"))
    assert out.spacing == volume.spacing and out.origin == volume.origin and out.direction == volume.direction


def test_cancel_mid_run_stops_the_worker_and_leaves_nothing(tiny_model_path):
    big = CTVolume(hu=qa_phantom((24, 64, 64), spacing_mm=3.0, seed=1), spacing=(0.7, 0.7, 2.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    job = StandardizeJob(big, str(tiny_model_path), steps=50, device="cpu").start()
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


def test_bad_model_file_fails_with_the_library_message(volume, tmp_path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"\x80\x04 a pickle pretending to be safetensors")
    job = StandardizeJob(volume, str(bogus), steps=2, device="cpu")
    with pytest.raises(JobError, match="pickle") as info:
        job.wait(timeout=120)
    assert info.value.kind == "ModelFileError" and not job.workdir.exists()


def test_worker_exits_when_its_parent_goes_away(volume, tiny_model_path):
    """The worker watches its stdin: closing it (the parent died) ends the worker."""
    job = StandardizeJob(volume, str(tiny_model_path), steps=500, device="cpu").start()
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
