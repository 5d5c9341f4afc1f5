"""Long LTDiffPP work in a worker subprocess: progress, cancel, clean failure. Qt-free.

The 3D Slicer module must stay responsive while a volume is standardized (minutes on a CPU) and while
radiomic features are extracted, so both run in a separate Python process (``PythonSlicer`` inside
Slicer, ``sys.executable`` elsewhere)::

    job = StandardizeJob(volume, model="/path/model.safetensors", steps=10, seed=0).start()
    while job.poll() == RUNNING:        # Slicer polls from a QTimer; scripts call job.wait()
        print(job.progress, job.message)
    hu = job.output_volume().hu         # only after DONE; raises JobError after FAILED / CANCELLED

Protocol: the worker (``python -m LTDiffPPLib.runner standardize|radiomics ...``) prints one JSON object
per line on stdout, prefixed with ``@@LTDIFFPP ``: ``{"event": "progress", "done": d, "total": n}``,
``{"event": "log", "message": ...}``, ``{"event": "warning", "message": ..., "category": ...}`` (every
Python warning and every WARNING log record the worker raises), ``{"event": "done", ...}`` or
``{"event": "error", "kind": ..., "message": ...}``. Other output lines are kept as log; stderr goes to
a file whose tail is quoted when the worker dies without saying why. The caller gets the warnings as
:attr:`Job.warnings` (a list of strings), and everything the worker said (log lines, warnings, errors,
its stderr) goes to the ``LTDiffPPLib.runner`` logger, i.e. to the application log inside 3D Slicer.

Guarantees: inputs and outputs live in a private temporary folder that is deleted when the job ends
(:meth:`Job.cleanup`, also called by :meth:`Job.wait` and on cancel); the worker writes its output
atomically and the caller reads it only after the ``done`` event AND exit status 0, so a cancelled or
failed run never yields a half-written result. :meth:`Job.cancel` kills the worker's whole process
group (POSIX; the process tree on Windows), i.e. the worker and every child it started (e.g. feature
extraction processes). The worker also exits when its parent goes away (its stdin closes). On Windows
the worker starts with a hidden window (as Slicer's ``slicer.util.launchConsoleProcess`` does), so no
console window flashes up on every run. torch is imported only in the worker, never by this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Cancelled, InputError, LTDiffPPError

log = logging.getLogger(__name__)

PREFIX = "@@LTDIFFPP "
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
NOT_STARTED = "not started"
#: the folder that holds the LTDiffPPLib package (put on the worker's PYTHONPATH)
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


class JobError(LTDiffPPError):
    """A worker job failed or was cancelled; ``kind`` names the worker's exception type (or 'Cancelled',
    'WorkerDied')."""

    def __init__(self, message: str, kind: str = "JobError"):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------------------- helpers
def python_executable() -> str:
    """The Python to run workers with: ``PythonSlicer`` inside 3D Slicer (whose ``sys.executable`` is the
    Slicer application itself), else this interpreter. ``LTDIFFPP_PYTHON`` overrides both."""
    override = os.environ.get("LTDIFFPP_PYTHON")
    if override:
        return override
    exe = Path(sys.executable)
    if "slicer" in exe.name.lower() and "python" not in exe.name.lower():
        for candidate in (exe.parent / "PythonSlicer", exe.parent / "PythonSlicer.exe",
                          shutil.which("PythonSlicer")):
            if candidate and Path(candidate).is_file():
                return str(candidate)
    return sys.executable


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): case-folded, runs of ``-_.`` as one ``-``
    (``ruamel.yaml``, ``ruamel_yaml`` and ``Ruamel-YAML`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(distribution name, full requirement line) for every requirement in a requirements file."""
    out = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
        out.append((name, line))
    return out


def installed_versions(paths: Sequence[str | os.PathLike] | None = None) -> dict[str, str]:
    """Canonical distribution name -> version of everything installed on ``paths`` (default:
    ``sys.path``), whatever the spelling of its ``.dist-info``/``.egg-info`` folder: the name comes from
    the distribution's metadata, as pip reads it. The first one found on the path wins, as for imports."""
    from importlib import metadata

    found: dict[str, str] = {}
    kwargs = {} if paths is None else {"path": [str(p) for p in paths]}
    for dist in metadata.distributions(**kwargs):
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if not name:  # a damaged metadata file: fall back to the folder name
            folder = Path(str(getattr(dist, "_path", ""))).name
            name = re.split(r"-\d", folder, maxsplit=1)[0]
        if name and dist.version:
            found.setdefault(canonical_name(name), dist.version)
    return found


def version_satisfies(version: str, requirement_line: str) -> bool:
    """True when ``version`` meets the requirement's specifier (always True without ``packaging``)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # cannot compare versions: presence is enough
        return True
    req = Requirement(requirement_line)
    return not req.specifier or req.specifier.contains(version, prereleases=True)


def missing_requirements(path: str | os.PathLike, *, paths: Sequence[str | os.PathLike] | None = None) -> list[str]:
    """Requirement lines of ``path`` that this Python does not satisfy (absent, or a version outside the
    specifier when the ``packaging`` module is there to compare). Names are matched as pip matches them
    (:func:`canonical_name`); ``paths`` defaults to ``sys.path``."""
    installed = installed_versions(paths)
    return [line for name, line in parse_requirements(path)
            if canonical_name(name) not in installed or not version_satisfies(installed[canonical_name(name)], line)]


def torch_problem(requirement: str = ">=2.4", *, paths: Sequence[str | os.PathLike] | None = None) -> str | None:
    """Why the installed PyTorch cannot serve the worker, or None when it can; read from the package
    metadata, so torch is NOT imported (the GUI process stays free of it). ``"missing"`` when it is not
    installed; otherwise a sentence naming the installed version and the ``requirement``."""
    version = installed_versions(paths).get("torch")
    if version is None:
        return "missing"
    if not version_satisfies(version, f"torch{requirement}"):
        return f"PyTorch {version} is installed, but LTDiffPP needs torch{requirement}"
    return None


def list_models(registry_path: str | os.PathLike | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """The shipped models (registry entries as dicts, each with its ``path``) and the default's name,
    read without importing torch (for the GUI process). Raises ModelFileError for an unreadable registry."""
    from dataclasses import asdict

    from .modelcard import registry

    entries, default = registry(registry_path)
    root = Path(registry_path).parent if registry_path is not None else None
    return [dict(asdict(e), path=str(root / "models" / e.file if root else e.path)) for e in entries], default


def model_summary(model: str | os.PathLike) -> dict[str, Any]:
    """Name, kernels, default steps and description of a registered model (by name) or a model file,
    from the safetensors header alone (no torch, no weights read). Raises ModelFileError."""
    from .modelcard import read_metadata, registry, resolve_model

    entries, _ = registry()
    by_name = {e.name: e for e in entries}
    registered = str(model) in by_name
    path, _ = resolve_model(model)
    meta = read_metadata(path)
    return {"name": meta.get("name") or path.stem, "path": str(path), "registered": registered,
            "source_kernel": meta.get("source_kernel", "?"), "target_kernel": meta.get("target_kernel", "?"),
            "kernels": list(meta.get("kernels") or []),  # a kernel-conditioned model's (source and target "any")
            "steps": meta.get("sampling", {}).get("steps"), "description": meta.get("description", ""),
            "untrained": meta.get("training", {}).get("status") == "untrained",
            "pixel_spacing_mm": meta.get("pixel_spacing_mm"),
            "registry_description": by_name[str(model)].description if registered else ""}


def pair_text(entry: dict[str, Any]) -> str:
    """What a registry entry or :func:`model_summary` converts, for the panel: "B30f → B70f", or "any two of
    B10f, B30f, …" for a kernel-conditioned model."""
    if entry.get("kernels"):
        return "any two of " + ", ".join(entry["kernels"])
    return f"{entry['source_kernel']} \u2192 {entry['target_kernel']}"


def model_caveats(model: str | os.PathLike | None = None) -> list[str]:
    """What a user must know before trusting a model's output, in plain words, from its model card and
    the registry (torch-free): how it was trained, which kernels and pixel sizes, what it was validated on.
    ``model``: registry name or file (None: the registry's default)."""
    if model is None:
        model = list_models()[1]
        if model is None:
            return ["No model is shipped: load a model file."]
    s = model_summary(model)
    if s["untrained"]:
        return ["UNTRAINED model (random weights): its output is not a kernel conversion."]
    spacing = s["pixel_spacing_mm"]
    size = (f" at {spacing[0]:g}-{spacing[1]:g} mm pixels" if spacing and spacing[0] != spacing[1]
            else f" at {spacing[0]:g} mm pixels" if spacing else "")
    what = (f"Converts between any two of {', '.join(s['kernels'])} (one model conditioned on the kernel pair)"
            if s["kernels"] else f"Converts {s['source_kernel']}-like images into {s['target_kernel']}-like images")
    caveats = [f"{what}{size}; other kernels, scanners and pixel sizes are outside what it learned (a warning says "
               "so for pixel size)."]
    if s["registered"]:
        caveats.insert(0, "Trained on simulated image pairs (a digital chest phantom and a chest CT, scanned and "
                          "reconstructed by the project's CT simulator), not on real paired scans.")
        validated = re.search(r"Mean CCC[^:]*", s["registry_description"])
        caveats.append(("Validated on real data: one Siemens chest slice (test1). " + validated.group(0).strip() + "."
                        if validated else "Validation: see docs/RESULTS.md.") + " Details: docs/RESULTS.md.")
    else:
        caveats.insert(0, "A model file from outside the shipped registry: its model card (ltdiffpp info) says how "
                          "it was trained and validated.")
    caveats.append("For research (radiomics harmonization), not for diagnosis.")
    return caveats


def popen_platform_kwargs(os_name: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``subprocess.Popen`` for a worker on this platform (``os_name``: ``os.name``).

    POSIX: its own session, so cancel can kill the whole process group. Windows: its own process group,
    and no window: ``CREATE_NO_WINDOW`` plus a ``STARTUPINFO`` with ``SW_HIDE``, the hidden-window launch
    of Slicer's own ``slicer.util.launchConsoleProcess`` (which cannot be used itself: it merges stderr
    into stdout and gives no process group to kill)."""
    if (os_name or os.name) != "nt":
        return {"start_new_session": True}
    # the numeric values are Windows' own (winbase.h); subprocess defines the names only on Windows
    create_new_process_group = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
    create_no_window = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
    info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]  # Windows only
    info.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", 0x00000001)
    info.wShowWindow = getattr(subprocess, "SW_HIDE", 0)
    return {"creationflags": create_new_process_group | create_no_window, "startupinfo": info}


#: command-line wording in library messages -> the words of the Slicer panel and of the Python API
_CLI_WORDING = (
    (re.compile(r"use --device (\w+) or (\w+)"), r"choose the device '\1' or '\2'"),
    (re.compile(r"pass a model file with --model PATH"), "load a model file (Load from file...)"),
    (re.compile(r"\s*\(series_uid / --series-uid\)"), ""),
    (re.compile(r"pass overwrite=True \(--overwrite\) or "), ""),
)


def panel_wording(message: str) -> str:
    """A library message with its command-line advice (``--device cpu``, ``--model PATH``) put in the
    words of the panel, for errors shown in Slicer (the library's own messages serve the CLI)."""
    for pattern, replacement in _CLI_WORDING:
        message = pattern.sub(replacement, message)
    return message


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(PREFIX + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _kill_tree(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Terminate ``proc`` and every process in its process group; SIGKILL what is left after ``grace_s``."""
    if proc.poll() is not None and os.name != "nt":
        # the leader is gone but children in its group may live on
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return
    if os.name == "nt":  # pragma: no cover - Windows only
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True, check=False)
        proc.wait()
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:  # children that ignored SIGTERM, or outlived the leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ----------------------------------------------------------------------------------------------- job
class Job:
    """A worker subprocess speaking the ``@@LTDIFFPP`` JSON-lines protocol.

    ``state`` is one of ``"not started"``, ``"running"``, ``"done"``, ``"failed"``, ``"cancelled"``;
    ``progress`` a fraction in [0, 1]; ``message`` the last status line; ``result`` the ``done`` event;
    ``error`` the failure message; ``warnings`` every warning the worker raised (strings, in order).
    Everything the worker says is also logged to the ``LTDiffPPLib.runner`` logger.

    ``workdir``: a folder for the job's files. When ``own_workdir`` (the default when ``workdir`` is
    None: a new folder under ``temp_root``, default the system temp) the job deletes it when it ends; a
    caller that wants temporaries elsewhere (Slicer: ``slicer.util.tempDirectory()``) passes a fresh
    folder with ``own_workdir=True``. Not thread-safe: call ``poll``/``wait``/``cancel`` from one thread.
    """

    def __init__(self, args: Sequence[str], *, workdir: str | os.PathLike | None = None,
                 python: str | None = None, env: Mapping[str, str] | None = None, title: str = "LTDiffPP job",
                 own_workdir: bool | None = None, temp_root: str | os.PathLike | None = None):
        self.args = [str(a) for a in args]
        self.python = python or python_executable()
        self.title = title
        self._own_workdir = workdir is None if own_workdir is None else own_workdir
        self.workdir = (Path(workdir) if workdir is not None
                        else Path(tempfile.mkdtemp(prefix="ltdiffpp-job-", dir=temp_root)))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._env = dict(env or {})
        self.state = NOT_STARTED
        self.progress = 0.0
        self.message = ""
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.error_kind: str | None = None
        self.log: list[str] = []
        self.warnings: list[str] = []
        self.events: list[dict[str, Any]] = []  # every protocol event, in order
        self.returncode: int | None = None
        self.started_at: float | None = None
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._stderr_file = None
        self._stdout_closed = False

    # -------------------------------------------------------------------------------- lifecycle
    @property
    def command(self) -> list[str]:
        return [self.python, *self.args]

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> Job:
        if self.state != NOT_STARTED:
            raise RuntimeError(f"{self.title} was already started")
        env = dict(os.environ)
        env.update(self._env)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        self._stderr_file = open(self.workdir / "stderr.log", "w+b")  # noqa: SIM115 - closed in cleanup
        log.info("%s: %s", self.title, " ".join(self.command))
        self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._stderr_file, cwd=str(self.workdir), env=env,
                                      **popen_platform_kwargs())
        self.state = RUNNING
        self.started_at = time.monotonic()
        self.message = f"{self.title}: starting"
        self._reader = threading.Thread(target=self._read_stdout, name="ltdiffpp-job-reader", daemon=True)
        self._reader.start()
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            for raw in stdout:
                self._lines.put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed under us (cancel)
            pass
        finally:
            stdout.close()  # the parent's end of the pipe: no descriptor leaks per job
            self._lines.put(None)

    def _log_line(self, line: str) -> None:
        self.log.append(line)
        log.info("%s: %s", self.title, line)

    def _handle(self, line: str) -> None:
        if not line.startswith(PREFIX):
            if line.strip():
                self._log_line(line)
            return
        try:
            event = json.loads(line[len(PREFIX):])
        except json.JSONDecodeError:
            self._log_line(line)
            return
        kind = event.get("event")
        self.events.append(event)
        if kind == "progress":
            total = float(event.get("total") or 0)
            self.progress = min(1.0, max(0.0, float(event.get("done", 0)) / total)) if total > 0 else 0.0
            if event.get("message"):
                self.message = str(event["message"])
        elif kind == "log":
            self.message = str(event.get("message", ""))
            self._log_line(self.message)
        elif kind == "warning":
            text = panel_wording(str(event.get("message", "")))
            self.warnings.append(text)
            log.warning("%s: %s", self.title, text)
        elif kind == "done":
            self.result = event
        elif kind == "error":
            self.error_kind = str(event.get("kind", "Error"))
            self.error = panel_wording(str(event.get("message", "unknown error")))
            log.error("%s: %s: %s", self.title, self.error_kind, self.error)

    def poll(self) -> str:
        """Take in what the worker said so far; return the state (never blocks)."""
        if self.state != RUNNING:
            return self.state
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._stdout_closed = True
                break
            self._handle(line)
        assert self._proc is not None
        if self._stdout_closed and self._proc.poll() is not None:
            self._finish(self._proc.returncode)
        return self.state

    def _finish(self, returncode: int) -> None:
        self.returncode = returncode
        self._log_stderr()
        if returncode == 0 and self.result is not None:
            self.state = DONE
            self.progress = 1.0
            self.message = self.result.get("message") or f"{self.title}: done"
            log.info("%s: %s", self.title, self.message)
            return
        self.state = FAILED
        if self.error is None:
            self.error_kind = "WorkerDied"
            tail = self.stderr_tail()
            self.error = (f"{self.title}: the worker process exited with status {returncode} without a result"
                          + (f"; its last output:\n{tail}" if tail else ""))
        self.message = f"{self.title} failed: {self.error}"
        self._remove_workdir()

    def wait(self, timeout: float | None = None, progress: Callable[[float, str], None] | None = None,
             interval: float = 0.05) -> dict[str, Any]:
        """Block until the job ends; return the ``done`` event, or raise :class:`JobError` (failure,
        cancel, or ``timeout`` seconds passed, which cancels the job). ``progress(fraction, message)``
        is called whenever either changes."""
        if self.state == NOT_STARTED:
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        try:
            while self.poll() == RUNNING:
                if progress is not None and (self.progress, self.message) != last:
                    last = (self.progress, self.message)
                    progress(*last)
                if deadline is not None and time.monotonic() > deadline:
                    self.cancel()
                    raise JobError(f"{self.title} timed out after {timeout} s and was cancelled", "Timeout")
                time.sleep(interval)
        except KeyboardInterrupt:
            self.cancel()
            raise
        if progress is not None and (self.progress, self.message) != last:
            progress(self.progress, self.message)
        return self.raise_for_state()

    def raise_for_state(self) -> dict[str, Any]:
        if self.state == DONE:
            assert self.result is not None
            return self.result
        if self.state == CANCELLED:
            raise JobError(f"{self.title} was cancelled; no output was written", "Cancelled")
        if self.state == FAILED:
            raise JobError(self.error or f"{self.title} failed", self.error_kind or "JobError")
        raise JobError(f"{self.title} is {self.state}", "NotFinished")

    def cancel(self) -> None:
        """Kill the worker and all its children; the job becomes CANCELLED and its files are removed."""
        if self.state == NOT_STARTED:
            self.state = CANCELLED
            self._remove_workdir()
            return
        if self.state != RUNNING:
            return
        assert self._proc is not None
        _kill_tree(self._proc)
        self.returncode = self._proc.returncode
        self.state = CANCELLED
        self.message = f"{self.title}: cancelled; no output was written"
        self._remove_workdir()

    def _log_stderr(self) -> None:
        """The worker's stderr (tracebacks, native libraries' chatter) to the log, before it is deleted."""
        text = self.stderr_tail(20_000)
        if text:
            log.info("%s: worker stderr:\n%s", self.title, text)

    def stderr_tail(self, n_chars: int = 2000) -> str:
        if self._stderr_file is None or self._stderr_file.closed:
            return ""
        self._stderr_file.flush()
        self._stderr_file.seek(0)
        text = self._stderr_file.read().decode("utf-8", "replace")
        return text[-n_chars:].strip()

    def _remove_workdir(self) -> None:
        if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        if self._reader is not None and self._proc is not None and self._proc.poll() is not None:
            self._reader.join(timeout=5)  # it closes stdout when the worker's end is gone
        if self._stderr_file is not None and not self._stderr_file.closed:
            self._stderr_file.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def cleanup(self) -> None:
        """Delete the job's temporary files (kills the worker first if it still runs)."""
        if self.state == RUNNING:
            self.cancel()
        self._remove_workdir()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# ------------------------------------------------------------------------------------ standardize
class StandardizeJob(Job):
    """Standardize a :class:`~LTDiffPPLib.io.CTVolume` (or an image file) in a worker process.

    ``model``: registry name, ``.safetensors`` path, a :class:`~LTDiffPPLib.modelfile.LoadedModel` (its
    file is used) or None (the registry's default). After :data:`DONE`, :meth:`output_volume` reads
    the result and deletes the temporary files; ``result`` holds ``description``, ``model`` (name,
    sha256, kernels), ``kernels`` (the source kernel and how it was found, the target, adaptations and
    overrides of the domain guard), ``steps``, ``solver``, ``seed``, ``seconds``. ``target_kernel``,
    ``source_kernel``, ``force``: as for ``ltdiffpp standardize``; ``dicom_kernel``: (Manufacturer,
    ConvolutionKernel) of the volume's DICOM header (taken from ``volume.dicom_header`` when it has one),
    which the worker's domain guard reads, since the volume travels as an image file. ``workdir``/``temp_root``: where the
    temporary files go (see :class:`Job`; a given ``workdir`` is taken over and deleted at the end).
    """

    def __init__(self, volume: Any, model: Any = None, *, device: str = "auto", steps: int | None = None,
                 solver: str | None = None, seed: int = 0, batch_size: int | None = None, ensemble: int = 1,
                 target_kernel: str | None = None, source_kernel: str | None = None, force: bool = False,
                 dicom_kernel: tuple[str, str] | None = None,
                 python: str | None = None, env: Mapping[str, str] | None = None,
                 workdir: str | os.PathLike | None = None, temp_root: str | os.PathLike | None = None):
        from .io import CTVolume

        model_arg = getattr(model, "path", model)
        header = getattr(volume, "dicom_header", None)
        if dicom_kernel is None and header is not None and header.get("ConvolutionKernel") is not None:
            value = header.get("ConvolutionKernel")
            dicom_kernel = (str(header.get("Manufacturer", "")),
                            "\\".join(value) if not isinstance(value, str) else value)
        workdir = _job_folder(workdir, temp_root, "ltdiffpp-standardize-")
        try:
            if isinstance(volume, CTVolume):
                input_path = workdir / "input.nrrd"
                write_temporary_nrrd(volume, input_path)
            else:
                input_path = Path(volume)
                if not input_path.exists():
                    raise InputError(f"{input_path}: input image not found")
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.output_path = workdir / "output.nrrd"
        args = ["-m", "LTDiffPPLib.runner", "standardize", str(input_path), str(self.output_path),
                "--device", device, "--seed", str(int(seed)), "--ensemble", str(int(ensemble)), "--watch-stdin"]
        if model_arg is not None:
            args += ["--model", str(model_arg)]
        if steps is not None:
            args += ["--steps", str(int(steps))]
        if solver is not None:
            args += ["--solver", solver]
        if batch_size is not None:
            args += ["--batch-size", str(int(batch_size))]
        for flag, value in (("--target-kernel", target_kernel), ("--source-kernel", source_kernel)):
            if value:
                args += [flag, str(value)]
        if force:
            args.append("--force")
        if dicom_kernel is not None:
            args += ["--dicom-manufacturer", dicom_kernel[0], "--dicom-kernel", dicom_kernel[1]]
        if getattr(volume, "source", ""):  # messages name the volume, not the temporary file
            args += ["--name", str(volume.source)]
        super().__init__(args, workdir=workdir, python=python, env=env, title="Standardization", own_workdir=True)

    def output_volume(self):
        """The standardized CTVolume (after DONE); raises :class:`JobError` otherwise."""
        from .io import read_image

        self.raise_for_state()
        try:
            return read_image(self.output_path)
        finally:
            self._remove_workdir()


def _job_folder(workdir: str | os.PathLike | None, temp_root: str | os.PathLike | None, prefix: str) -> Path:
    """The job's folder: ``workdir`` (created if missing; must be empty) or a new one under ``temp_root``."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=temp_root))
    folder = Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise InputError(f"{folder}: the folder for a job's temporary files must be empty")
    return folder


def integer_hu(hu: np.ndarray, chunk: int = 16) -> bool:
    """True when every voxel is a whole number within int16, i.e. the volume can be stored as int16
    without loss (checked ``chunk`` slices at a time: no full-size temporary copy)."""
    for z in range(0, hu.shape[0], chunk):
        part = hu[z:z + chunk]
        if part.size and (part.min() < -32768 or part.max() > 32767 or not np.array_equal(part, np.rint(part))):
            return False
    return True


def write_temporary_nrrd(volume: Any, path: Path) -> Path:
    """A temporary NRRD for a worker, geometry exact: int16 when the HU are whole numbers (as scanners
    store them), else float32; zlib level 1 (a few times smaller than raw, at little CPU cost)."""
    import SimpleITK as sitk

    from .io import to_sitk

    if integer_hu(volume.hu):
        image = sitk.GetImageFromArray(np.ascontiguousarray(volume.hu, dtype=np.int16))
        image.SetSpacing(volume.spacing)
        image.SetOrigin(volume.origin)
        image.SetDirection(volume.direction)
    else:
        image = to_sitk(volume)
    sitk.WriteImage(image, str(path), True, 1)  # useCompression, compressionLevel
    return path


# --------------------------------------------------------------------------------------- radiomics
class RadiomicsJob(Job):
    """Radiomic features of the same ROIs in several volumes, in a worker process.

    ``volumes``: name → CTVolume (all on one grid); ``rois``: :class:`~LTDiffPPLib.radiomics.Roi` list;
    ``params``: parameter file path (default: the shipped one); ``image_types`` (e.g. ``{"Original": {}}``)
    and ``mode`` ('2d'/'3d') override it. After :data:`DONE`, :meth:`features` returns name → DataFrame.
    """

    def __init__(self, volumes: Mapping[str, Any], rois: Sequence[Any], *, params: str | os.PathLike | None = None,
                 image_types: Mapping[str, Mapping[str, Any]] | None = None, mode: str | None = None,
                 workers: int | None = None, python: str | None = None, env: Mapping[str, str] | None = None,
                 workdir: str | os.PathLike | None = None, temp_root: str | os.PathLike | None = None):
        if not volumes:
            raise InputError("no volumes to extract features from")
        if not rois:
            raise InputError("no ROIs to extract features from")
        workdir = _job_folder(workdir, temp_root, "ltdiffpp-radiomics-")
        try:
            spec: dict[str, Any] = {"volumes": {}, "params": None if params is None else str(params),
                                    "image_types": None if image_types is None else dict(image_types),
                                    "mode": mode, "workers": workers}
            for i, (name, volume) in enumerate(volumes.items()):
                path = workdir / f"volume{i}.nrrd"
                write_temporary_nrrd(volume, path)
                spec["volumes"][name] = str(path)
            arrays = {}
            spec["rois"] = []
            for i, roi in enumerate(rois):
                spec["rois"].append({"name": roi.name, "start": list(map(int, roi.start)),
                                     "shape": list(map(int, roi.shape)), "label": roi.label,
                                     "stratum": roi.stratum, "reference_mean": roi.reference_mean})
                arrays[f"mask{i}"] = roi.box_mask().astype(bool)
            np.savez_compressed(workdir / "rois.npz", **arrays)
            (workdir / "spec.json").write_text(json.dumps(spec))
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        self.out_dir = workdir / "features"
        args = ["-m", "LTDiffPPLib.runner", "radiomics", str(workdir / "spec.json"), str(self.out_dir),
                "--watch-stdin"]
        super().__init__(args, workdir=workdir, python=python, env=env, title="Radiomics", own_workdir=True)

    def features(self):
        """name → DataFrame (rows: ROIs, columns: features), after DONE."""
        import pandas as pd

        result = self.raise_for_state()
        try:
            return {name: pd.read_csv(path, index_col="roi") for name, path in result["tables"].items()}
        finally:
            self._remove_workdir()


# ------------------------------------------------------------------------------------------ sample
class SampleJob(Job):
    """Make (or find cached) the sample data of :mod:`LTDiffPPLib.sampledata` under ``cache_root`` in a
    worker process. After :data:`DONE`, ``result["files"]`` maps node names to files (they stay: a cache)."""

    def __init__(self, cache_root: str | os.PathLike, *, shape: Sequence[int] | None = None,
                 workers: int | None = None, python: str | None = None, env: Mapping[str, str] | None = None,
                 temp_root: str | os.PathLike | None = None):
        args = ["-m", "LTDiffPPLib.runner", "sample", str(cache_root), "--watch-stdin"]
        if shape is not None:
            args += ["--shape", ",".join(str(int(n)) for n in shape)]
        if workers is not None:
            args += ["--workers", str(int(workers))]
        super().__init__(args, python=python, env=env, title="Sample data", temp_root=temp_root)

    def files(self) -> dict[str, Path]:
        result = self.raise_for_state()
        return {name: Path(path) for name, path in result["files"].items()}


# ------------------------------------------------------------------------------------------ worker
def _watch_parent() -> None:
    """Exit when the parent closes our stdin (it was cancelled, or died)."""
    def watch() -> None:
        try:  # the raw descriptor, not sys.stdin: a thread blocked in a buffered read hangs shutdown
            while os.read(0, 1024):
                pass
        except (OSError, ValueError):
            pass
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


class _WarningEvents(logging.Handler):
    """In the worker: WARNING (and worse) log records as ``warning`` events."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _emit("warning", message=record.getMessage(), category=f"log:{record.name}")
        except Exception:  # noqa: BLE001 - a log record must never kill the worker
            pass


def _forward_warnings() -> None:
    """Send every Python warning and every WARNING log record of this process to the parent as a
    ``warning`` event (stderr is deleted after a successful run: nothing may stay only there)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        _emit("warning", message=str(message), category=category.__name__)

    warnings.showwarning = show
    logging.getLogger().addHandler(_WarningEvents(logging.WARNING))


class _Throttle:
    """Emit progress at most every ``interval`` s, but always for the first/last value and for every
    advance of at least ``step`` of the total (so a short run still reports its intermediate steps)."""

    def __init__(self, interval: float = 0.1, step: float = 0.05):
        self.interval, self.step = interval, step
        self.last_time, self.last_done = 0.0, None

    def __call__(self, done: float, total: float, message: str = "", force: bool = False) -> None:
        now = time.monotonic()
        big_step = self.last_done is None or (total > 0 and (done - self.last_done) / total >= self.step)
        if force or big_step or now - self.last_time >= self.interval or done >= total:
            self.last_time, self.last_done = now, done
            _emit("progress", done=float(done), total=float(total), message=message)


def _work_standardize(a: argparse.Namespace) -> None:
    from .guard import plan_conversion
    from .inference import pick_device, standardize_volume
    from .io import read_image, write_image
    from .modelfile import load_model

    t0 = time.perf_counter()
    volume = read_image(a.input)
    volume.source = a.name or volume.source
    if a.dicom_kernel is not None:  # the header kernel of the volume the application holds
        volume.dicom_header = dicom_kernel_header(a.dicom_manufacturer or "", a.dicom_kernel)
    plan = plan_conversion(volume, a.target_kernel, a.source_kernel, a.model, a.force)
    _emit("log", message=f"{plan.source.kernel.name} -> {plan.target.name}: source kernel {plan.source.describe()}; "
                         f"loading the model {plan.model}")
    model = load_model(plan.model)
    meta = model.metadata
    steps = int(meta["sampling"]["steps"] if a.steps is None else a.steps)
    solver = a.solver or meta["sampling"]["solver"]
    device = str(pick_device(a.device))
    n = volume.hu.shape[0]
    throttle = _Throttle()
    message = f"Standardizing {n} slices on {device}"
    _emit("log", message=message)
    throttle(0, n, message, force=True)
    converted, plan = standardize_volume(volume, model=model, plan=plan, device=a.device, steps=steps, solver=solver,
                                         seed=a.seed, batch_size=a.batch_size, ensemble=a.ensemble,
                                         progress=lambda done, total: throttle(done * n / total, n, message))
    write_image(converted, a.output)
    seconds = time.perf_counter() - t0
    name = meta.get("name") or model.path.stem
    description = (f"LTDiffPP {plan.source.kernel.name} -> {plan.target.name}; source kernel {plan.source.describe()}; "
                   f"model {name} (sha256 {model.sha256[:12]}); {solver} {steps} steps; seed {a.seed}"
                   + (f"; ensemble {a.ensemble}" if a.ensemble > 1 else "")
                   + "".join(f"; {k}: {v}" for k, v in plan.provenance().items() if k in ("adapted", "overridden")))
    _emit("done", output=str(a.output), description=description, steps=steps, solver=solver, seed=a.seed,
          device=device, seconds=round(seconds, 2),
          model={"name": name, "sha256": model.sha256, "path": str(model.path),
                 "source_kernel": meta["source_kernel"], "target_kernel": meta["target_kernel"]},
          kernels={"source": plan.source.kernel.name, "how": plan.source.how, "source_text": plan.source.describe(),
                   "target": plan.target.name, "adapted": plan.notes, "overridden": plan.overridden},
          message=f"Done: {n} slices in {seconds:.1f} s on {device}")


def dicom_kernel_header(manufacturer: str, kernel: str) -> Any:
    """A header holding only Manufacturer and ConvolutionKernel (values separated by '\\'), what the
    domain guard reads to identify the source kernel of a volume passed to the worker as an image file."""
    from pydicom import Dataset

    ds = Dataset()
    ds.Manufacturer = manufacturer
    ds.ConvolutionKernel = kernel.split("\\") if "\\" in kernel else kernel
    return ds


def _work_radiomics(a: argparse.Namespace) -> None:
    from .io import atomic_output, read_image
    from .radiomics import Roi, extract_features_many, load_params

    spec = json.loads(Path(a.spec).read_text())
    params = load_params(spec.get("params"))
    if spec.get("image_types"):
        params = params.with_image_types(spec["image_types"])
    if spec.get("mode"):
        params = params.with_mode(spec["mode"])
    masks = np.load(Path(a.spec).parent / "rois.npz")
    rois = [Roi(name=r["name"], start=tuple(r["start"]), shape=tuple(r["shape"]), mask=masks[f"mask{i}"],
                label=r.get("label"), stratum=r.get("stratum"), reference_mean=r.get("reference_mean"))
            for i, r in enumerate(spec["rois"])]
    volumes = {name: read_image(path) for name, path in spec["volumes"].items()}
    total = len(rois) * len(volumes)
    message = f"Radiomics: {len(rois)} ROIs x {len(volumes)} volumes"
    _emit("log", message=message)
    _emit("progress", done=0, total=total, message=message)
    tables = extract_features_many(volumes, rois, params, workers=spec.get("workers"),
                                   progress=lambda d, t: _emit("progress", done=d, total=t, message=message))
    out = Path(a.out_dir)
    with atomic_output(out, is_dir=True) as tmp:
        for i, table in enumerate(tables.values()):
            table.to_csv(tmp / f"features{i}.csv", index_label="roi")
    _emit("done", tables={name: str(out / f"features{i}.csv") for i, name in enumerate(tables)},
          message=f"Done: {total} ROI feature sets")


def _work_sample(a: argparse.Namespace) -> None:
    from .sampledata import SAMPLE_SHAPE, cached_sample, generate_sample

    shape = tuple(int(n) for n in a.shape.split(",")) if a.shape else SAMPLE_SHAPE
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"--shape must be three positive sizes z,y,x; got {a.shape!r}")
    message = ("Reading the cached sample" if cached_sample(a.cache_root, shape) is not None
               else f"Making the sample: a chest phantom of {shape[0]} slices, scanned and reconstructed")
    _emit("log", message=message)
    throttle = _Throttle()
    throttle(0, shape[0], message, force=True)
    files = generate_sample(a.cache_root, shape=shape, workers=a.workers,
                            progress=lambda d, n: throttle(d, n, message))
    _emit("done", files={name: str(path) for name, path in files.items()}, message="Sample data ready")


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of the worker process (``python -m LTDiffPPLib.runner ...``)."""
    p = argparse.ArgumentParser(prog="python -m LTDiffPPLib.runner",
                                description="LTDiffPP worker process (JSON-lines progress on stdout)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("standardize")
    s.add_argument("input")
    s.add_argument("output")
    s.add_argument("--model")
    s.add_argument("--device", default="auto")
    s.add_argument("--steps", type=int)
    s.add_argument("--solver")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--ensemble", type=int, default=1)
    s.add_argument("--target-kernel")
    s.add_argument("--source-kernel")
    s.add_argument("--force", action="store_true")
    s.add_argument("--dicom-manufacturer")
    s.add_argument("--dicom-kernel")
    s.add_argument("--name", help="what messages call the volume (default: the input file)")
    s.set_defaults(func=_work_standardize)
    r = sub.add_parser("radiomics")
    r.add_argument("spec")
    r.add_argument("out_dir")
    r.set_defaults(func=_work_radiomics)
    m = sub.add_parser("sample")
    m.add_argument("cache_root")
    m.add_argument("--shape", help="z,y,x voxels (default: the shipped sample's)")
    m.add_argument("--workers", type=int)
    m.set_defaults(func=_work_sample)
    for sp in (s, r, m):
        sp.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes (the parent is gone)")
    a = p.parse_args(argv)
    if a.watch_stdin:
        _watch_parent()
    _forward_warnings()
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    try:
        a.func(a)
    except Cancelled as exc:
        _emit("error", kind="Cancelled", message=str(exc))
        return 130
    except LTDiffPPError as exc:
        _emit("error", kind=type(exc).__name__, message=str(exc))
        return 2
    except Exception as exc:  # anything else: say what, keep the traceback on stderr
        import traceback

        traceback.print_exc()
        _emit("error", kind=type(exc).__name__, message=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
