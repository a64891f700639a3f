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
    # module level includes statements nested in top-level if/try blocks (they run at import too)
    def module_level(body):
        for node in body:
            yield node
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
    wrapper = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "FoBSegmentParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)


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


def _wrapper_fields(tree: ast.Module) -> set[str]:
    wrapper = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "FoBSegmentParameterNode")
    return {s.target.id for s in wrapper.body if isinstance(s, ast.AnnAssign)}


def test_parameter_names_agree_between_ui_wrapper_and_logic(tree: ast.Module) -> None:
    fields = _wrapper_fields(tree)
    bound = set()
    for w in _ui_widgets().values():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.add(prop.find("string").text)
    assert bound and bound <= fields, f"SlicerParameterName not in the wrapper: {bound - fields}"
    logic = ast.parse((ROOT / "FoBSegmentLib" / "slicer_logic.py").read_text(encoding="utf-8"))
    params = next(c for c in logic.body if isinstance(c, ast.ClassDef) and c.name == "FoBParameters")
    names = {s.target.id for s in params.body if isinstance(s, ast.AnnAssign)}
    refs = next(
        n.value for n in logic.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "NODE_REFERENCES"
    )
    names |= {e.value for e in refs.elts}
    assert fields == names, f"wrapper vs FoBParameters/NODE_REFERENCES differ: {fields ^ names}"


def _cmake_extension_vars() -> dict[str, str]:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', text)}


def _s4ext() -> dict[str, str]:
    out = {}
    for line in (ROOT / "FoBExtension.s4ext").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


def test_cmake_and_s4ext_metadata_agree() -> None:
    cm, s4 = _cmake_extension_vars(), _s4ext()
    required = ["HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS",
                "BUILD_SUBDIRECTORY"]
    for key in required:
        assert cm.get(key), f"CMakeLists.txt lacks EXTENSION_{key}"
        assert s4.get(key.lower()) == cm[key], f"{key}: s4ext {s4.get(key.lower())!r} != CMake {cm[key]!r}"
    assert "PyTorch" in cm["DEPENDS"].split()
    assert s4["scmurl"].removesuffix(".git") == cm["HOMEPAGE"]
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("find_package(Slicer REQUIRED)", "add_subdirectory(FoBSegment)", "Slicer_EXTENSION_CPACK"):
        assert needed in text
    # the URLs point at files that exist in this repository
    for url in [cm["ICONURL"], *cm["SCREENSHOTURLS"].split()]:
        rel = url.split("/main/", 1)[1]
        assert (ROOT / rel).is_file(), f"{url} -> {rel} missing"


def test_module_cmake_lists_existing_files_and_installs_the_engine() -> None:
    text = (ROOT / "FoBSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "FoBSegmentLib/*.py" in text
    block = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1)
    for item in block.split():
        path = ROOT / "FoBSegment" / item.replace("${MODULE_NAME}", "FoBSegment")
        assert path.is_file(), f"listed resource {item} missing"
    assert (ROOT / "FoBSegment" / "FoBSegment.py").is_file()


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
