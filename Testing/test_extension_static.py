"""Static checks of the Slicer extension: module imports, the .ui file, packaging metadata, images.

The module file must load in a bare Slicer (before FoBSegment's Python packages are installed), so its
top-level imports are limited to what Slicer provides; FoBSegmentLib and torch are imported in functions.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "FoBSegment" / "FoBSegment.py"
UI = ROOT / "FoBSegment" / "Resources" / "UI" / "FoBSegment.ui"
ALLOWED_TOP = {"__future__", "slicer", "qt", "ctk", "vtk", "numpy"}
LAZY_ONLY = {"FoBSegmentLib", "torch", "segment_anything", "SimpleITK", "scipy", "skimage", "cv2", "PyTorchUtils"}


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def _top_name(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module or ""]
    return []


def test_module_imports_only_what_slicer_provides(tree: ast.Module) -> None:
    # module level includes statements nested in top-level if/try blocks (they run at import too), not
    # function bodies
    def module_level(body):
        for node in body:
            yield node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for attr in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, attr, []) or []:
                    if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        yield from module_level([child])

    bad = []
    for node in module_level(tree.body):
        for name in _top_name(node):
            root = name.split(".")[0]
            if root not in ALLOWED_TOP and root not in sys.stdlib_module_names:
                bad.append(name)
    assert not bad, f"FoBSegment.py imports at module level what Slicer does not provide: {bad}"


def test_engine_and_torch_are_imported_lazily_inside_functions(tree: ast.Module) -> None:
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    lazy_found = set()
    for node in ast.walk(tree):
        for name in _top_name(node):
            root = name.split(".")[0]
            if root in LAZY_ONLY:
                lazy_found.add(root)
                p = parents.get(node)
                while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    p = parents.get(p)
                assert p is not None, f"{name} imported outside a function (line {node.lineno})"
    assert "FoBSegmentLib" in lazy_found, "the module should use the engine (lazily)"


def test_module_has_the_slicer_classes(tree: ast.Module) -> None:
    classes = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["FoBSegment"]
    assert "ScriptedLoadableModuleWidget" in classes["FoBSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["FoBSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["FoBSegmentTest"]


def _ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()  # raises on invalid XML
    assert root.tag == "ui" and root.get("version") == "4.0"
    return {w.get("name"): w for w in root.iter("widget")}


def test_ui_is_valid_and_has_every_widget_the_module_uses(tree: ast.Module) -> None:
    widgets = _ui_widgets()
    used = set()
    for node in ast.walk(tree):
        # self.ui.<name> and ui.<name> (the local alias in setup)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            used.add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ui":
            used.add(node.attr)
        # getattr(self.ui, "name") in loops over button names
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            if ast.unparse(node.args[0]) == "self.ui":
                for t in ast.walk(tree):
                    if isinstance(t, ast.Tuple) and all(isinstance(e, ast.Constant) and str(e.value).endswith("Button") for e in t.elts):
                        used.update(e.value for e in t.elts)
    assert len(used) > 15
    missing = sorted(u for u in used if u not in widgets)
    assert not missing, f".ui lacks widgets the module uses: {missing}"
    top = ET.parse(UI).getroot().find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "FoBSegment"


def test_one_parameter_definition_for_the_wrapper_and_the_logic(tree: ast.Module) -> None:
    """The widget's parameterNodeWrapper is built from FoBSegmentLib.slicer.parameters (no second list of
    fields in FoBSegment.py), and every widget bound in the .ui names one of its parameters."""
    from dataclasses import MISSING, fields
    from typing import Annotated, get_args, get_origin

    from FoBSegmentLib.slicer.parameters import (
        MAX_SLICE_INDEX,
        NODE_REFERENCES,
        FoBParameters,
        wrapper_class_body,
    )

    for cls in (c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)):
        assert not any("parameterNodeWrapper" in ast.unparse(d) for d in cls.decorator_list), (
            f"{cls.name}: the wrapper's fields come from FoBSegmentLib.slicer.parameters, not a class body"
        )
    builder = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "parameterNodeClass")
    assert {"wrapper_class_body", "parameterNodeWrapper", "WithinRange"} <= {
        n.id if isinstance(n, ast.Name) else getattr(n, "name", "") for n in ast.walk(builder)
    } | {a.name for n in ast.walk(builder) if isinstance(n, ast.ImportFrom) for a in n.names}

    body = wrapper_class_body(lambda lo, hi: ("range", lo, hi), lambda name: name)
    annotations = body["__annotations__"]
    names = {f.name for f in fields(FoBParameters)} | set(NODE_REFERENCES)
    assert set(annotations) == names
    for f in fields(FoBParameters):
        assert f.default is not MISSING and body[f.name] == f.default
        if f.type in ("int", int):
            # plain int would let the wrapper reset the spin boxes to +-2**31
            assert get_origin(annotations[f.name]) is Annotated, f.name
            kind, (_, lo, hi) = get_args(annotations[f.name])
            assert kind is int and lo <= f.default <= hi
    assert get_args(annotations["sliceStart"])[1][1:] == (-1, MAX_SLICE_INDEX) and MAX_SLICE_INDEX >= 9999
    assert annotations["inputVolume"] == "vtkMRMLScalarVolumeNode" and "inputVolume" not in body

    bound = set()
    for w in _ui_widgets().values():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.find("string").text)
    assert bound and bound <= names, f"SlicerParameterName not in the parameters: {bound - names}"


class _FakeParameterNode:
    """The part of vtkMRMLScriptedModuleNode the parameter functions use."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def GetParameter(self, name: str) -> str:
        return self.values.get(name, "")

    def SetParameter(self, name: str, value: str) -> None:
        self.values[name] = value

    def StartModify(self) -> int:
        return 0

    def EndModify(self, was: int) -> None:
        pass


def test_parameters_round_trip_and_keep_defaults_for_bad_values() -> None:
    from FoBSegmentLib.slicer.parameters import FoBParameters, read_parameters, write_parameters

    node = _FakeParameterNode()
    params = FoBParameters(segmentID="liver", sliceAxis=1, sliceStart=3, sliceStop=40, segmenter="grabcut")
    write_parameters(node, params)
    assert node.values["sliceStart"] == "3" and node.values["segmentID"] == "liver"
    assert read_parameters(node) == params
    node.values.update(sliceAxis="7", numBackgroundPoints="many", sliceStop="-5")
    back = read_parameters(node)
    assert (back.sliceAxis, back.numBackgroundPoints, back.sliceStop) == (-1, 16, -1)


def _cmake_extension_vars() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text)}


def test_cmake_and_the_extensions_index_entry_agree() -> None:
    """FoBSegment.json is the catalog entry the current Extensions Index uses (one JSON per extension,
    named like the CMake project; the legacy .s4ext is gone); it and CMakeLists.txt must agree."""
    import json

    cm = _cmake_extension_vars()
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    project = re.search(r"project\((\w+)\)", text).group(1)
    entry_path = ROOT / f"{project}.json"
    assert entry_path.is_file(), f"the Extensions Index entry must be named after project({project})"
    assert not list(ROOT.glob("*.s4ext")), "the legacy .s4ext description is not used by the current index"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    # the schema allows no other properties (additionalProperties: false); these three are required
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "scm_revision", "scm_type",
               "scm_url", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#", entry["$schema"])
    assert entry["build_dependencies"] == cm["DEPENDS"].split() and "PyTorch" in entry["build_dependencies"]
    assert entry["category"] == cm["CATEGORY"] and entry["build_subdirectory"] == cm["BUILD_SUBDIRECTORY"]
    assert entry["scm_url"].removesuffix(".git") == cm["HOMEPAGE"]
    required = ["HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS",
                "BUILD_SUBDIRECTORY"]
    for key in required:
        assert cm.get(key), f"CMakeLists.txt lacks EXTENSION_{key}"
    for needed in ("find_package(Slicer REQUIRED)", "add_subdirectory(FoBSegment)", "Slicer_EXTENSION_CPACK"):
        assert needed in text
    # the URLs point at files that exist in this repository
    for url in [cm["ICONURL"], *cm["SCREENSHOTURLS"].split()]:
        rel = url.split("/main/", 1)[1]
        assert (ROOT / rel).is_file(), f"{url} -> {rel} missing"


def test_self_test_data_is_shipped_small_and_attributed() -> None:
    """The registered ctest (FoBSegmentTest) runs on Testing/Data, which the build machines have: the
    files exist, are small, carry CHAOS's attribution, and the ctest is pointed at them."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    names = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
             for t in n.targets if isinstance(t, ast.Name) and t.id in ("TEST_IMAGE", "TEST_LABEL")}
    data = ROOT / "Testing" / "Data"
    files = [data / names["TEST_IMAGE"], data / names["TEST_LABEL"]]
    assert all(f.is_file() for f in files)
    assert sum(f.stat().st_size for f in files) < 400_000, "test data in the repository stays a few hundred KB"
    readme = (data / "README.md").read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in readme and "Kavur" in readme and names["TEST_IMAGE"] in readme
    test_src = ast.get_source_segment(MODULE.read_text(encoding="utf-8"),
                                      next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "FoBSegmentTest"))
    assert "shared_data_dir" not in test_src and "FOB_DATA" not in test_src, "the ctest must not need ../shared/data"
    cmake = (ROOT / "FoBSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"set_tests_properties\(py_\$\{MODULE_NAME\} PROPERTIES ENVIRONMENT "
                     r"\"FOB_TEST_DATA=\$\{PROJECT_SOURCE_DIR\}/Testing/Data\"\)", cmake)


def test_module_cmake_lists_existing_files_and_installs_the_engine() -> None:
    text = (ROOT / "FoBSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "FoBSegmentLib/*.py" in text
    block = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1)
    for item in block.split():
        path = ROOT / "FoBSegment" / item.replace("${MODULE_NAME}", "FoBSegment")
        assert path.is_file(), f"listed resource {item} missing"
    assert (ROOT / "FoBSegment" / "FoBSegment.py").is_file()


def _dev_only() -> list[str]:
    """FOBSEGMENTLIB_DEV_ONLY of FoBSegment/CMakeLists.txt: path prefixes left out of the extension."""
    text = (ROOT / "FoBSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"list\(FILTER FOBSEGMENTLIB_SCRIPTS EXCLUDE REGEX", text), "the exclusion must be applied"
    return re.search(r"set\(FOBSEGMENTLIB_DEV_ONLY(.*?)\)", text, re.S).group(1).split()


def _installed_engine_files() -> list[str]:
    """What the CMake glob and filter install: FoBSegmentLib/**/*.py minus the development-only prefixes."""
    files = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "FoBSegmentLib").rglob("*.py"))
    return [f for f in files if not any(f.startswith(prefix) for prefix in _dev_only())]


def _module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _engine_imports(path: Path) -> set[str]:
    """FoBSegmentLib modules a file imports anywhere (module level or inside functions), with the packages
    above them (importing a module runs its packages' __init__)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts if path.name == "__init__.py" else rel.parts[:-1])
    if path.name == "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "FoBSegmentLib":
                continue
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i]))}
    return found


def test_extension_installs_the_runtime_only_and_it_never_imports_the_rest() -> None:
    dev_only = _dev_only()
    for needed in ("FoBSegmentLib/train/", "FoBSegmentLib/bench/", "FoBSegmentLib/evaluate/"):
        assert needed in dev_only, f"{needed} must not be installed into the extension"
    installed = _installed_engine_files()
    assert "FoBSegmentLib/slicer/logic.py" in installed and "FoBSegmentLib/slicer/parameters.py" in installed
    assert not any(f.startswith(("FoBSegmentLib/train/", "FoBSegmentLib/evaluate/")) for f in installed)

    def as_file(module: str) -> str:
        return _module_file(module).relative_to(ROOT).as_posix()

    # each installed module, and the widget, imports (transitively) only installed modules
    starts = {f: _engine_imports(ROOT / f) for f in installed}
    starts[MODULE.relative_to(ROOT).as_posix()] = _engine_imports(MODULE)
    assert "FoBSegmentLib.slicer.logic" in starts["FoBSegment/FoBSegment.py"]
    for start, direct in starts.items():
        seen, todo = set(), list(direct)
        while todo:
            module = todo.pop()
            if module in seen:
                continue
            seen.add(module)
            todo.extend(_engine_imports(_module_file(module)))
        outside = sorted(as_file(m) for m in seen if as_file(m) not in installed)
        assert not outside, f"{start} reaches development-only modules the extension does not install: {outside}"


def test_icons_and_screenshot() -> None:
    for icon in (ROOT / "Resources" / "Icons" / "FoBSegment.png", ROOT / "FoBSegment" / "Resources" / "Icons" / "FoBSegment.png"):
        with Image.open(icon) as im:
            assert im.format == "PNG" and im.size == (128, 128)
    with Image.open(ROOT / "Resources" / "FoBSegmentScreenshot.png") as im:
        assert im.format == "PNG" and min(im.size) >= 256
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]


def test_requirements_leave_torch_to_the_pytorch_extension() -> None:
    reqs = [
        line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in (ROOT / "FoBSegment" / "Resources" / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert reqs and not {"torch", "numpy", "simpleitk"} & set(reqs)
    assert not any("git+" in r or "://" in r for r in reqs)
