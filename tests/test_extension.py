"""The Slicer extension's packaging: every module file is listed in CMake; the module file parses.

The Qt widget itself cannot run here (no Slicer application); its logic delegates to
LTDiffPPLib.mrml, which tests/test_mrml.py exercises on real MRML nodes.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LTDiffPP"


def _cmake_listed() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    blocks = re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s(.*?)\)", text, re.S)
    return {f.replace("${MODULE_NAME}", "LTDiffPP") for block in blocks for f in block.split()}


def test_every_script_and_resource_is_listed_in_cmake():
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*") if p.is_file() and p.suffix in (".py", ".png", ".ui", ".json")}
    assert on_disk and on_disk <= _cmake_listed(), f"not listed in LTDiffPP/CMakeLists.txt: {on_disk - _cmake_listed()}"
    assert all((MODULE / f).is_file() for f in _cmake_listed()), "CMake lists files that do not exist"


def test_extension_metadata_and_icon():
    text = (ROOT / "CMakeLists.txt").read_text()
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{field} ", text), field
    assert "add_subdirectory(LTDiffPP)" in text
    png = (ROOT / "LTDiffPP.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 128 and int.from_bytes(png[20:24], "big") == 128


def test_module_defines_the_scripted_module_classes():
    tree = ast.parse((MODULE / "LTDiffPP.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"LTDiffPP", "LTDiffPPWidget", "LTDiffPPLogic", "LTDiffPPTest"} <= classes
