"""Facts about the machine and software: available memory, the CPU's name, library versions.

Used for the memory check before reading a volume, and for provenance (DICOM SoftwareVersions,
image-file header fields) and benchmark / model-card records.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

__all__ = ["available_memory", "cpu_name", "software_versions"]


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup (container) limit; None
    when unknown (then the size check is skipped)."""
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                candidates.append(max(0, int(limit) - int(Path(usage_file).read_text().strip())))
            break
        except (OSError, ValueError):
            continue
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(candidates)


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what ``platform`` knows (for benchmark and model-card records).

    Virtual machines often report a bare family name ("AMD EPYC") for CPUs of different generations, so the
    family/model numbers and the widest vector extension (AVX-512 with or without BF16, AVX2) are appended."""
    try:
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if info:
                    break  # the first processor is enough
                continue
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            flags = set(info.get("flags", "").split())
            isa = ("AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags
                   else "AVX2" if "avx2" in flags else "")
            ids = f"family {info['cpu family']} model {info['model']}" if {"cpu family", "model"} <= set(info) else ""
            extra = ", ".join(x for x in (ids, isa) if x)
            return f"{info['model name']} ({extra})" if extra else info["model name"]
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def software_versions() -> dict[str, str]:
    """LTDiffPP's version and those of the libraries that shape its output (torch only when loaded)."""
    from .. import __version__

    versions = {"ltdiffpp": __version__, "python": sys.version.split()[0], "numpy": np.__version__,
                "pydicom": pydicom.__version__, "SimpleITK": sitk.Version_VersionString()}
    if "torch" in sys.modules:
        versions["torch"] = str(sys.modules["torch"].__version__)
    return versions
