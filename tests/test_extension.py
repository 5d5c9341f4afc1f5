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
    # parameters without a bound widget are managed by the widget code on purpose (model: combo + file;
    # the kernels: combos whose item data, not text, is the value)
    assert set(params) - set(bound) == {"model", "targetKernel", "sourceKernel"}


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
class _Base:
    def __init__(self, parent=None, *args, **kwargs):
        self.parent = parent  # as the real base classes keep it

    def onReload(self):  # the real one re-imports the module file into the running application (Qt)
        pass


def qt_stand_in_modules() -> dict[str, types.ModuleType]:
    """Minimal stand-ins for the Qt-only modules LTDiffPP.py imports, which exist only inside the Slicer
    application (``qt``, the ScriptedLoadableModule base classes, ``parameterNodeWrapper``,
    ``slicer.i18n``). The test base class is a real ``unittest.TestCase``; ``delayDisplay`` (a Qt
    dialog in Slicer) records its messages in ``displayed``."""
    import unittest

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    displayed: list[str] = []
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,), {
        "displayed": displayed, "delayDisplay": lambda self, message, msec=None: displayed.append(message)})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = lambda choices: ("Choice", tuple(choices))
    pnw.WithinRange = lambda lo, hi: ("WithinRange", lo, hi)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    return {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": slm,
            "slicer.parameterNodeWrapper": pnw, "slicer.i18n": i18n}


def load_module(scene, app=None):
    """Import LTDiffPP.py with the stand-ins in place (``sys.modules`` must already hold them)."""
    import importlib.util

    import slicer

    slicer.util.VTKObservationMixin = _Base
    slicer.mrmlScene = scene
    slicer.app = app
    spec = importlib.util.spec_from_file_location("LTDiffPP_under_test", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_module_with_qt_stand_ins(monkeypatch, scene, app=None):
    """Import LTDiffPP.py on slicer-core: real MRML, real ``slicer.util``; the Qt-only modules it imports
    are replaced by minimal stand-ins (the GUI classes are defined but not exercised)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
    for name, module in qt_stand_in_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer.util, "VTKObservationMixin", _Base, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    return load_module(scene, app)


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
    out = logic.standardize(ct, model=str(tiny_model_path), steps=2, seed=0, device="cpu", sourceKernel="B30f")
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


# ---------------------------------------------------------------------------- self-test, torch, reload
def test_self_test_installs_nothing_and_raises_no_skiptest(monkeypatch, tmp_path):
    """On the extension factory's shared Slicer (or on *Reload and Test*) with the worker's packages
    missing: the self-test must install nothing and must not raise (skipTest shows an exception dialog).
    The Qt GUI-binding test cannot run without the application: it is replaced by a recorder here."""
    from LTDiffPPLib.mrml import headless_scene

    module = _load_module_with_qt_stand_ins(monkeypatch, headless_scene())
    import slicer

    installs = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: installs.append(("pip", a)), raising=False)
    torch_utils = types.ModuleType("PyTorchUtils")
    torch_utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(
        installTorch=lambda **k: installs.append(("torch", k)), torchInstalled=lambda: False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
    req = tmp_path / "requirements.txt"
    req.write_text("safetensors>=0.4\nsurely-not-installed-ltdiffpp-xyz>=1\n")  # a package really missing
    monkeypatch.setattr(module, "REQUIREMENTS_FILE", str(req))
    gui_tests = []
    monkeypatch.setattr(module.LTDiffPPTest, "test_parameter_node_and_gui_binding", lambda self: gui_tests.append(1))
    test = module.LTDiffPPTest()
    test.displayed.clear()
    test.runTest()  # no exception: nothing raised, nothing skipped
    assert installs == [] and gui_tests == [1]
    assert any("not run" in m and "surely-not-installed-ltdiffpp-xyz>=1" in m for m in test.displayed)
    assert slicer.mrmlScene.GetFirstNodeByName("phantom") is None  # the worker tests did not run
    # and by construction: the test class never reaches an installer, and never calls skipTest
    tree = ast.parse(MODULE_PY.read_text())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LTDiffPPTest")
    calls = {ast.unparse(c.func).split(".")[-1] for c in ast.walk(test_class) if isinstance(c, ast.Call)}
    assert not calls & {"checkDependencies", "installTorch", "pip_install", "skipTest"}, calls


_SUBPROCESS_PRELUDE = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_extension as t
sys.modules.update(t.qt_stand_in_modules())
from LTDiffPPLib.mrml import headless_scene
module = t.load_module(headless_scene())
"""


def _run_python(code: str) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS_PRELUDE + code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_the_application_process_never_imports_torch():
    """Entering the module, listing and describing models, the device label, the dependency check and
    the status text run in Slicer's own process: torch must stay out of it (it lives in the worker)."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    out = _run_python("""
logic = module.LTDiffPPLogic()
entries, default = logic.availableModels()
print(bool(logic.modelInfoText(default)), bool(logic.modelCaveatsText(default)))
print(logic.deviceAvailabilityText())
print(logic.missingDependencies(radiomics=True)["packages"])
import numpy as np, slicer
from LTDiffPPLib.io import CTVolume
from LTDiffPPLib.mrml import update_node_from_volume
node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
hu = np.full((2, 64, 64), -1000.0, np.float32); hu[:, 8:-8, 8:-8] = 40.0
update_node_from_volume(node, CTVolume(hu=hu, spacing=(0.7, 0.7, 2.0), origin=(0, 0, 0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
node.SetAttribute("DICOM.Manufacturer", "SIEMENS"); node.SetAttribute("DICOM.ConvolutionKernel", "B30f")
print(logic.kernelPreviewText(node, "B50f"))
print(logic.targetKernels(), "B10f" in logic.sourceKernels())
print("torch" in sys.modules)
""").splitlines()
    assert out[-3].startswith("B30f \u2192 B50f: source kernel B30f (DICOM header: SIEMENS B30f); model ltdiffpp-b30f-b50f")
    assert "B70f" in out[-2] and "B50f" in out[-2] and out[-2].endswith("True")
    assert out[0] == "True True"
    assert out[-1] == "False", "torch was imported in the application's process"
    assert "PyTorch" in out[1] and out[2] == "[]"


def test_reload_reloads_the_library_too():
    """*Reload* in developer mode must pick up edits of LTDiffPPLib, not only of LTDiffPP.py (the widget is
    constructed without its Qt setup; the base class's own reload is Qt and is a no-op stand-in)."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    out = _run_python("""
import LTDiffPPLib.runner as runner, LTDiffPPLib.mrml as mrml, LTDiffPPLib.sampledata as sampledata
runner.PREFIX, mrml._LOGICS, sampledata.SAMPLE_SEED = "edited", (), -1
old_error = runner.JobError
module.LTDiffPPWidget().onReload()
print(runner.PREFIX, len(mrml._LOGICS) > 0, sampledata.SAMPLE_SEED, runner.JobError is not old_error)
""")
    assert out.split() == ["@@LTDIFFPP", "True", "1000", "True"]
    code = MODULE_PY.read_text()
    library = ({p.stem for p in (ROOT / "LTDiffPPLib").glob("*.py")}
               | {p.parent.name for p in (ROOT / "LTDiffPPLib").glob("*/__init__.py")}) - {"__init__"}
    reloaded = set(re.search(r"LIBRARY_MODULES = \(([^)]*)\)", code).group(1).replace('"', "").replace(",", " ")
                   .split())
    # every library module the GUI process imports is reloaded (torch-side modules load in the worker)
    assert {"runner", "mrml", "sampledata", "io", "errors"} <= reloaded <= library


# ------------------------------------------------------------------------- Apply to all, status text
def test_apply_to_all_and_the_status_text_through_the_logic(monkeypatch, tiny_model_path):
    """``logic.standardizeFolder`` (the *Apply to all* button) on a real scene with real workers, polled
    like the widget polls it; the status text the panel shows carries the worker's warnings."""
    import time

    from LTDiffPPLib.io import CTVolume
    from LTDiffPPLib.mrml import headless_scene, sh_item, subject_hierarchy, update_node_from_volume
    from LTDiffPPLib.phantom import qa_phantom

    scene = headless_scene()
    module = _load_module_with_qt_stand_ins(monkeypatch, scene)
    sh = subject_hierarchy(scene)
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "cases")
    for i, mm in enumerate((0.7, 2.0)):  # the second is outside the model's pixel range: a warning
        vol = CTVolume(hu=qa_phantom((1, 32, 32), spacing_mm=6.0, seed=i), spacing=(mm, mm, 2.0),
                       origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1.0))
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"case{i}")
        update_node_from_volume(node, vol)
        sh.SetItemParent(sh_item(scene, node), folder)
    logic = module.LTDiffPPLogic()
    batch = logic.standardizeFolder(folder, model=str(tiny_model_path), steps=1, device="cpu",
                                    waitForCompletion=False, sourceKernel="B30f")
    texts = []
    while batch.poll() == "running":
        texts.append(logic.statusText(batch))
        time.sleep(0.05)
    outputs = batch.finish()
    assert [o.GetName() for o in outputs] == ["case0_B70f", "case1_B70f"]
    final = logic.statusText(batch)
    assert final.startswith("Batch done: 2 of 2 volumes standardized")
    assert "Warning: case1: in-plane pixels 2 x 2 mm resampled to 1 mm" in final and "case0:" not in final
    assert any(t.startswith("Volume 1 of 2 (case0)") for t in texts)


# ------------------------------------------------------------------------------------------ sample data
def test_sample_data_registration_makes_and_loads_the_phantom(monkeypatch, tmp_path):
    """The module registers the chest phantom with Sample Data; its custom downloader (what the Sample
    Data button calls) makes the files in the worker and loads them. Sample Data is a Qt module of the
    application: a stand-in records the registration and checks it as SampleDataSource does (one URI,
    file name, node name and file type per file); the progress dialog is a Qt stand-in too."""
    from LTDiffPPLib.mrml import headless_scene

    registered = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(category="Custom", sampleName=None, uris=None, fileNames=None,
                                           nodeNames=None, customDownloader=None, thumbnailFileName=None,
                                           loadFileType="VolumeFile", loadFiles=None, loadFileProperties=None,
                                           checksums=None):
            assert len(uris) == len(fileNames) == len(nodeNames) == len(loadFileType)
            registered.append(dict(category=category, sampleName=sampleName, uris=uris, fileNames=fileNames,
                                   nodeNames=nodeNames, customDownloader=customDownloader,
                                   thumbnailFileName=thumbnailFileName))

    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = SampleDataLogic
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    connected = []
    app = types.SimpleNamespace(cachePath=str(tmp_path / "cache"), connect=lambda *a: connected.append(a),
                                processEvents=lambda: None)  # the Qt application: a stand-in
    scene = headless_scene()
    module = _load_module_with_qt_stand_ins(monkeypatch, scene, app=app)
    import slicer

    dialogs = []
    monkeypatch.setattr(slicer.util, "createProgressDialog", lambda **k: dialogs.append(
        types.SimpleNamespace(value=0, labelText="", close=lambda: None)) or dialogs[-1], raising=False)
    module.LTDiffPP(types.SimpleNamespace())  # the module object connects the registration to startup
    assert connected and connected[0][0] == "startupCompleted()"
    module.registerSampleData(shape=(2, 64, 64))
    (entry,) = registered
    assert entry["category"] == "LTDiffPP" and entry["sampleName"] == "LTDiffPPChestPhantom"
    assert entry["nodeNames"] == ["ChestPhantom_B30f", "ChestPhantom_B70f", "ChestPhantom_B50f",
                                  "ChestPhantom_tissues"]
    assert Path(entry["thumbnailFileName"]).is_file()
    assert all(u.startswith("file:") and not u.startswith("file://http") for u in entry["uris"])
    nodes = entry["customDownloader"](types.SimpleNamespace(sampleName=entry["sampleName"]))  # the button
    assert [n.GetName() for n in nodes] == entry["nodeNames"]
    assert all(scene.GetNodeByID(n.GetID()) is n for n in nodes)
    from urllib.parse import unquote, urlparse

    assert all(Path(unquote(urlparse(u).path)).is_file() for u in entry["uris"])  # Sample Data can load them now
    assert dialogs and dialogs[0].value == 100


# ------------------------------------------------------------------------------- catalog and metadata
#: the Extensions Index's accepted categories that could fit this extension (scripts/check_description_files.py)
INDEX_CATEGORIES = {"Filtering", "Quantification", "Image Synthesis", "Informatics", "Analysis"}


def test_catalog_and_metadata_pass_the_extensions_index_checks():
    entry = json.loads((ROOT / "LTDiffPP.json").read_text())
    cmake = (ROOT / "CMakeLists.txt").read_text()
    repo = entry["scm_url"].rstrip("/").rsplit("/", 1)[1].removesuffix(".git")
    assert repo.startswith("Slicer"), "the Index's check_git_repository_name"
    assert not "LTDiffPP".lower().startswith("slicer"), "check_extension_name: the extension name must not"
    assert re.search(r"project\(\s*LTDiffPP\s*\)", cmake), "check_cmakelists_content: project() = JSON name"
    assert entry["scm_url"].startswith("https://") and entry["category"] in INDEX_CATEGORIES
    for url in re.findall(r'set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS) "([^"]+)"\)', cmake):
        assert f"/{repo}/" in url and url.endswith(".png")
    assert (ROOT / "LICENSE").is_file() and "MIT" in (ROOT / "LICENSE").read_text()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', cmake).group(1)
    name_org = r"[^,()]+ \([^()]+\)"
    assert re.fullmatch(rf"{name_org}(, {name_org})*", contributors), contributors
    module_contributors = re.search(r"CONTRIBUTORS = \[(.*)\]", MODULE_PY.read_text()).group(1)
    assert all(re.fullmatch(name_org, c) for c in re.findall(r'"([^"]+)"', module_contributors))
    # the description names the kernels actually shipped, and none that are not
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"\)', cmake).group(1)
    registry = json.loads((ROOT / "LTDiffPPLib" / "resources" / "registry.json").read_text())
    for model in registry["models"]:  # a kernel-conditioned model: its kernels, except those refused by default
        names = [k.replace("-", " ") for k in model.get("kernels", []) if not k.startswith("GE-")] or [model["source_kernel"], model["target_kernel"]]
        assert all(k in description for k in names), (names, description)
    assert not re.search(r"\b(Br40|Bl64)\b", description) and "simulated" in description


def test_category_is_translated_in_slicers_core_context():
    tree = ast.parse(MODULE_PY.read_text())
    init = next(f for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LTDiffPP"
                for f in n.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    (assign,) = [a for a in ast.walk(init) if isinstance(a, ast.Assign)
                 and ast.unparse(a.targets[0]) == "self.parent.categories"]
    assert ast.unparse(assign.value) == "[translate('qSlicerAbstractCoreModule', 'Filtering')]"


def test_docs_state_the_slicer_versions_the_index_serves_and_the_licence():
    slicer_md = (ROOT / "docs" / "SLICER.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "5.6 or later" not in slicer_md
    assert "Python 3.12" in slicer_md and "Preview" in slicer_md
    assert re.search(r"## Licen[cs]e", readme) and "MIT" in readme
