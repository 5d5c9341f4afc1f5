"""The Slicer extension's packaging and the module's GUI wiring, checked without the Slicer application.

- every module file is listed in CMake, every LTDiffPPLib file is covered by the install patterns;
- the .ui parses, every widget the module code uses exists in it, every custom widget class is a real
  Slicer/CTK class (checked list below), every ``SlicerParameterName`` names a parameter of the
  ``@parameterNodeWrapper`` class with a type the widget can represent (Slicer's GUI connectors);
- the Extensions Index catalog entry follows the catalog schema and agrees with the CMake metadata;
- the module imports nothing heavy at load time and its console API has the documented signatures;
- the Logic runs for real on a headless slicer-core scene. The Qt-only pieces it imports (``qt``,
  the ScriptedLoadableModule base classes, ``parameterNodeWrapper``, ``slicer.i18n``) do not exist
  outside the application and are replaced by minimal stand-ins there, nothing else is mocked.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LTDiffPP"
UI_FILE = MODULE / "Resources" / "UI" / "LTDiffPP.ui"
MODULE_PY = MODULE / "LTDiffPP.py"

#: Custom widget classes a module .ui may use: class -> header. Each was checked to exist in Slicer
#: (Libs/MRML/Widgets, Base/QTGUI) or CTK (Libs/Widgets) with that header; add to this list only after
#: checking the class in the Slicer/CTK sources.
KNOWN_CUSTOM_WIDGETS = {
    "qMRMLWidget": "qMRMLWidget.h",
    "qMRMLNodeComboBox": "qMRMLNodeComboBox.h",
    "qMRMLCheckableNodeComboBox": "qMRMLCheckableNodeComboBox.h",
    "qMRMLSubjectHierarchyComboBox": "qMRMLSubjectHierarchyComboBox.h",
    "qMRMLSegmentSelectorWidget": "qMRMLSegmentSelectorWidget.h",
    "qMRMLCollapsibleButton": "qMRMLCollapsibleButton.h",
    "ctkCollapsibleButton": "ctkCollapsibleButton.h",
    "ctkCollapsibleGroupBox": "ctkCollapsibleGroupBox.h",
    "ctkPathLineEdit": "ctkPathLineEdit.h",
    "ctkSliderWidget": "ctkSliderWidget.h",
    "ctkRangeWidget": "ctkRangeWidget.h",
    "ctkMenuButton": "ctkMenuButton.h",
    "ctkCheckableComboBox": "ctkCheckableComboBox.h",
}
#: Widget types Slicer's parameterNodeWrapper GUI connectors bind (they compare the exact class), and
#: the parameter types each can represent ("node": an MRML node type; "choice": str with Choice).
CONNECTABLE = {
    "qMRMLNodeComboBox": {"node"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float"},
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "QLineEdit": {"str"},
    "QTextEdit": {"str"},
    "QComboBox": {"choice", "enum"},
    "ctkPathLineEdit": {"Path"},
    "ctkDirectoryButton": {"Path"},
}


# ------------------------------------------------------------------------------------------- CMake
def _cmake_listed() -> set[str]:
    text = (MODULE / "CMakeLists.txt").read_text()
    blocks = re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s(.*?)\)", text, re.S)
    return {f.replace("${MODULE_NAME}", "LTDiffPP") for block in blocks for f in block.split()}


def test_every_script_and_resource_is_listed_in_cmake():
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    listed = _cmake_listed()
    assert {"LTDiffPP.py", "Resources/UI/LTDiffPP.ui", "Resources/requirements.txt",
            "Resources/Icons/LTDiffPP.png"} <= on_disk
    assert on_disk <= listed, f"not listed in LTDiffPP/CMakeLists.txt: {on_disk - listed}"
    assert all((MODULE / f).is_file() for f in listed), "CMake lists files that do not exist"
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def _glob_recurse_matches(pattern: str, path: str) -> bool:
    """CMake file(GLOB_RECURSE dir/*.ext): any file below dir whose name matches *.ext."""
    folder, name = pattern.rsplit("/", 1)
    return path.startswith(folder + "/") and fnmatch.fnmatch(path.rsplit("/", 1)[1], name)


def test_library_install_patterns_cover_the_whole_package():
    text = (MODULE / "CMakeLists.txt").read_text()
    patterns = re.search(r"set\(LTDIFFPPLIB_PATTERNS\s(.*?)\)", text, re.S).group(1).split()
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "LTDiffPPLib").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert "LTDiffPPLib/runner.py" in files and "LTDiffPPLib/resources/radiomics_params.yaml" in files
    uncovered = [f for f in files if not any(_glob_recurse_matches(p, f) for p in patterns)]
    assert not uncovered, f"LTDiffPPLib files the extension would not install: {uncovered}"
    registry = json.loads((ROOT / "LTDiffPPLib" / "resources" / "registry.json").read_text())
    for entry in registry["models"]:  # every shipped model file exists and is installed
        path = f"LTDiffPPLib/resources/models/{entry['file']}"
        assert (ROOT / path).is_file() and any(_glob_recurse_matches(p, path) for p in patterns)
    assert "install(FILES" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text


def test_extension_metadata_and_icon():
    text = (ROOT / "CMakeLists.txt").read_text()
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf"set\(EXTENSION_{field} ", text), field
    for needed in ("project(LTDiffPP)", "find_package(Slicer REQUIRED)", "add_subdirectory(LTDiffPP)",
                   "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert needed in text, needed
    png = (ROOT / "LTDiffPP.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 128 and int.from_bytes(png[20:24], "big") == 128


# ------------------------------------------------------------------------------------- catalog JSON
#: the Extensions Index catalog-entry schema v1.0.2 (Slicer/Schemas), as constraints checked here
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                 "enabled": bool, "tier": int}


def test_catalog_entry_follows_the_extensions_index_schema():
    entry = json.loads((ROOT / "LTDiffPP.json").read_text())
    assert CATALOG_REQUIRED <= set(entry), CATALOG_REQUIRED - set(entry)
    assert set(entry) <= set(CATALOG_TYPES), f"keys the schema does not allow: {set(entry) - set(CATALOG_TYPES)}"
    for key, value in entry.items():
        assert isinstance(value, CATALOG_TYPES[key]), key
    assert re.match(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                    r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#$", entry["$schema"])
    assert entry.get("scm_type", "git") in ("git", "local") and 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    # it agrees with the extension's own CMake metadata
    cmake = (ROOT / "CMakeLists.txt").read_text()
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', cmake).group(1).split()
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', cmake).group(1)
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]*)"\)', cmake).group(1)
    assert sorted(entry["build_dependencies"]) == sorted(depends)
    assert entry["category"] == category
    assert entry["scm_url"].removesuffix(".git") == homepage


# ---------------------------------------------------------------------------------------------- .ui
def _ui() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def _ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in _ui().iter("widget")}


def test_ui_parses_with_a_qmrmlwidget_at_the_top():
    root = _ui()
    top = root.find("widget")
    assert root.tag == "ui" and top.get("class") == "qMRMLWidget" and top.get("name") == "LTDiffPP"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_widgets_used_by_the_module_code_exist_in_the_ui():
    code = MODULE_PY.read_text()
    used = set(re.findall(r"\bui\.(\w+)", code))
    assert {"applyButton", "progressBar", "statusLabel", "modelComboBox", "radiomicsButton"} <= used
    missing = used - set(_ui_widgets())
    assert not missing, f"the module code uses widgets the .ui lacks: {missing}"


def test_custom_widget_classes_are_real_slicer_or_ctk_classes():
    root = _ui()
    declared = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    for cls, header in declared.items():
        assert cls in KNOWN_CUSTOM_WIDGETS, f"{cls} is not a checked Slicer/CTK widget class"
        assert header == KNOWN_CUSTOM_WIDGETS[cls], f"{cls}: header {header}"
    for name, cls in _ui_widgets().items():
        assert cls.startswith("Q") or cls in declared, f"{name}: class {cls} is neither Qt nor declared"


def test_mrml_widgets_get_the_scene():
    root = _ui()
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == "LTDiffPP" and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {n for n, c in _ui_widgets().items() if c.startswith("qMRML") and n != "LTDiffPP"}
    assert mrml and mrml <= connected, f"MRML widgets without the scene: {mrml - connected}"


def _parameters() -> dict[str, str]:
    """name -> annotation source of the @parameterNodeWrapper class in LTDiffPP.py."""
    tree = ast.parse(MODULE_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in LTDiffPP.py")


def _kind(annotation: str) -> str:
    if annotation.startswith("vtkMRML"):
        return "node"
    if "Choice(" in annotation:
        return "choice"
    base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
    return {"int": "int", "float": "float", "bool": "bool", "str": "str", "pathlib.Path": "Path",
            "Path": "Path"}.get(base, base)


def test_parameter_names_bind_to_widgets_that_can_represent_them():
    params = _parameters()
    assert {"inputVolume", "outputVolume", "model", "device", "steps", "seed", "segmentation",
            "referenceVolume"} <= set(params)
    bound = {}
    for w in _ui().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = w.get("class")
    assert bound, "no widget carries a SlicerParameterName"
    for name, cls in bound.items():
        assert name in params, f"SlicerParameterName {name!r} is not a parameter"
        kind = _kind(params[name])
        assert kind in CONNECTABLE.get(cls, set()), f"{name}: a {cls} cannot represent {params[name]}"
    # parameters without a bound widget are managed by the widget code on purpose (model: combo + file)
    assert set(params) - set(bound) == {"model"}


# ------------------------------------------------------------------------------------- module code
def test_module_defines_the_scripted_module_classes_and_api():
    tree = ast.parse(MODULE_PY.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"LTDiffPP", "LTDiffPPParameterNode", "LTDiffPPWidget", "LTDiffPPLogic", "LTDiffPPTest"} <= set(classes)
    methods = {f.name: f for f in classes["LTDiffPPLogic"].body if isinstance(f, ast.FunctionDef)}

    def signature(fn: ast.FunctionDef) -> list[tuple[str, str | None]]:
        args = fn.args.args[1:]
        defaults = [None] * (len(args) - len(fn.args.defaults)) + [ast.unparse(d) for d in fn.args.defaults]
        return [(a.arg, d) for a, d in zip(args, defaults)]

    assert signature(methods["standardize"])[:7] == [
        ("inputVolumeNode", None), ("outputVolumeNode", "None"), ("model", "None"), ("device", "'auto'"),
        ("steps", "None"), ("seed", "0"), ("waitForCompletion", "True")]
    assert [a for a, _ in signature(methods["computeRadiomicsCCC"])[:3]] == [
        "segmentationNode", "volumeNodes", "referenceVolumeNode"]
    test_methods = {f.name for f in classes["LTDiffPPTest"].body if isinstance(f, ast.FunctionDef)}
    assert "runTest" in test_methods and "test_standardize_synthetic_volume" in test_methods


def test_module_imports_nothing_heavy_and_installs_nothing_at_load():
    tree = ast.parse(MODULE_PY.read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert top <= {"__future__", "importlib", "logging", "os", "sys", "typing", "qt", "ctk", "vtk", "slicer"}, top
    module_level_calls = [ast.unparse(n) for n in tree.body if isinstance(n, ast.Expr)]
    assert not any("pip_install" in c or "installTorch" in c for c in module_level_calls)


# ------------------------------------------------------------------------ the Logic on a real scene
def _load_module_with_qt_stand_ins(monkeypatch, scene):
    """Import LTDiffPP.py on slicer-core: real MRML, real ``slicer.util``; the Qt-only modules it imports
    are replaced by minimal stand-ins (the GUI classes are defined but not exercised)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

    class _Base:
        def __init__(self, *args, **kwargs):
            pass

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setattr(slicer.util, "VTKObservationMixin", _Base, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", None, raising=False)
    import importlib.util

    spec = importlib.util.spec_from_file_location("LTDiffPP_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_console_api_on_a_real_scene(monkeypatch, tiny_model_path):
    """``LTDiffPPLogic().standardize(...)`` and ``computeRadiomicsCCC(...)`` as typed in the Python
    console: worker processes for real, results in the scene."""
    import numpy as np

    from LTDiffPPLib.io import CTVolume
    from LTDiffPPLib.mrml import headless_scene, update_node_from_volume
    from LTDiffPPLib.phantom import qa_phantom

    scene = headless_scene()
    module = _load_module_with_qt_stand_ins(monkeypatch, scene)
    import slicer

    vol = CTVolume(hu=qa_phantom((2, 48, 48), spacing_mm=4.0, seed=3), spacing=(0.7, 0.7, 2.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    update_node_from_volume(ct, vol)
    logic = module.LTDiffPPLogic()
    info = logic.modelInfoText(str(tiny_model_path))
    assert "B30f" in info and "UNTRAINED" in info
    out = logic.standardize(ct, model=str(tiny_model_path), steps=2, seed=0, device="cpu")
    assert out.GetName() == "CT_B70f" and scene.GetNodeByID(out.GetID()) is out
    assert slicer.util.arrayFromVolume(out).shape == (2, 48, 48)

    labels = np.zeros(vol.hu.shape, np.int16)
    labels[:, 2:14, 2:14], labels[:, 20:34, 4:16], labels[:, 30:46, 30:46] = 1, 2, 3
    lab = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    update_node_from_volume(lab, vol.with_hu(labels))
    slicer.util.updateVolumeFromArray(lab, labels)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    update_node_from_volume(reference, vol)
    features, ccc = logic.computeRadiomicsCCC(seg, [ct, out], reference, imageTypes={"Original": {}})
    assert features.IsA("vtkMRMLTableNode") and ccc.IsA("vtkMRMLTableNode")
    columns = [ccc.GetTable().GetColumn(i).GetName() for i in range(ccc.GetTable().GetNumberOfColumns())]
    assert "CT: mean" in columns and "CT_B70f: mean" in columns
