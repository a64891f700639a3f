"""FoBSegment's Logic over MRML nodes: everything the Slicer module does, without Qt or `slicer.app`.

It takes the scene and nodes as arguments and uses only the MRML/VTK classes that the `slicer-core`
wheel also provides, so it runs (and is tested) headless; the module's widget is a thin adapter.
MRML <-> numpy is in `mrml`, the prompt point lists in `point_lists`, the settings in `parameters`.

Frames:
    [k, j, i]   numpy arrays of volumes and masks (as `slicer.util.arrayFromVolume` returns them).
    IJK         voxel index (i, j, k) of the input volume; slices are taken along one array axis.
    local RAS   a node's own frame; world RAS = parent_to_world @ local RAS (linear parent transforms only).
    (x, y)      (column, row) pixels of one slice, the frame of `PromptSet`.

Segmentation results are written into one segment only; each user action (segmenting some slices, a
propagation) saves one undo state first.

Live propagation (the widget's "Propagate volume"): the worker runs `run_propagation(job, on_slice=...)`
and queues each accepted slice; the main thread writes it with `apply_slice_result` as it arrives, so
slices appear one by one. The undo state is saved once, before the first slice is written; the final
`apply_propagation` writes the cleaned-up result without another undo state, so the run stays ONE undo
step. On cancel or error, `rollback_propagation` removes the partial result (the policy: a cancelled
run changes nothing, as before); with the Logic's own history the partial result stays available as Redo.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import slicer

from FoBSegmentLib.io.coords import put_slice, slice_axes, take_slice
from FoBSegmentLib.job import JobSettings, PreparedImage, build_job, load_components, prepare_image
from FoBSegmentLib.labelmap import nonempty_slices, write_binary_slices
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation import PropagationConfig
from FoBSegmentLib.propagation.refine import parse_refine, refine_slice
from FoBSegmentLib.slicer import point_lists, worker
from FoBSegmentLib.slicer.mrml import (
    engine_volume_source,
    resolve_axis,
    segment_editor_logic,
    segment_mask,
    segmentation_fingerprint,
    set_segment_mask,
    set_segment_slice,
    set_segment_slice_masked,
    slice_at_world_point,
    slice_center_world,
    view_slice,
)
from FoBSegmentLib.slicer.parameters import (
    NODE_REFERENCES,
    FoBParameters,
    Masking,
    find_parameter_node,
    read_parameters,
    write_parameters,
)
from FoBSegmentLib.slicer.worker import CancelCheck, ProgressCallback, PropagationJob, SliceCallback

__all__ = ["FoBSegmentLogic", "PropagationJob", "UndoMarks"]


TAINTED = "changed by someone else during the action"


@dataclasses.dataclass
class UndoMarks:
    """Fingerprints (`mrml.segmentation_fingerprint`) beside one segmentation's undo history, one pair
    per undoable FoB action: the segmentation just before it and as it left it (TAINTED when something
    else changed it during the action). `redo`: the pairs of undone actions; `restored`: the segmentation
    right after the last undo (a redo is refused once it changed)."""

    before: list[str] = dataclasses.field(default_factory=list)
    after: list[str] = dataclasses.field(default_factory=list)
    redo: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    restored: str | None = None

    def saved(self, before: str, limit: int) -> None:
        # a new action starts a new branch: the undone ones cannot be redone
        self.before.append(before)
        self.after.append("")
        del self.before[:-limit], self.after[:-limit]
        self.redo.clear()


class FoBSegmentLogic:
    """The module's Logic. Usable from the Python console, tests and the widget.

    undo_callback(segmentation): when given (the widget passes the Segment Editor's `saveStateForUndo`),
    it is called once before each FoB write, besides the Logic's own `vtkSegmentationHistory`, so every
    FoB action is one step of the editor's Undo too. FoB's own `undo` refuses when the segmentation
    changed after FoB's last write (see `undo`).

    masking: None (scripts, tests: FoB writes its segment only, overlap with other segments allowed), or
    the Segment Editor's settings (`parameters.Masking`; the widget reads them before each action):
    editable area, editable intensity range and "modify other segments" then apply to FoB's writes.
    """

    def __init__(self, scene, undo_callback: Callable[[Any], None] | None = None, max_undo_states: int = 10,
                 masking: Masking | None = None) -> None:
        self.scene = scene
        self.undo_callback = undo_callback
        self.masking = masking
        self.max_undo_states = int(max_undo_states)
        self._histories: dict[str, Any] = {}
        self._segmenters: dict[tuple[str, str, str], Any] = {}
        self._images: dict[str, tuple[tuple, Any]] = {}
        self._generators: dict[tuple[str, str], Any] = {}
        self._undo_marks: dict[str, UndoMarks] = {}

    # --- parameters --------------------------------------------------------------------------------

    def parameter_node(self, create: bool = True):
        return find_parameter_node(self.scene, create)

    def parameters(self) -> FoBParameters:
        node = self.parameter_node()
        return read_parameters(node)

    def set_parameters(self, params: FoBParameters, **nodes) -> None:
        """Store settings and node references (inputVolume=..., segmentation=..., ...) with the scene."""
        node = self.parameter_node()
        write_parameters(node, params)
        for role, value in nodes.items():
            if role not in NODE_REFERENCES:
                raise ValueError(f"unknown node reference {role!r}; use one of {', '.join(NODE_REFERENCES)}")
            node.SetNodeReferenceID(role, value.GetID() if value is not None else None)

    def referenced_node(self, role: str):
        node = self.parameter_node(create=False)
        return node.GetNodeReference(role) if node is not None else None

    # --- inputs ------------------------------------------------------------------------------------

    def slice_axis(self, volume, axis: int | None = None) -> int:
        """The array axis to slice along: `axis` if given (>= 0), else the volume's axial axis."""
        return resolve_axis(volume, axis)

    def image_source(self, volume, settings: JobSettings | None = None,
                     what: str = "image") -> Callable[[], PreparedImage]:
        """Main thread: what `prepared_image` needs from the node, as a function that prepares it on any
        thread. Normalising a large volume takes seconds, so the widget calls the function on its worker;
        here only the voxels are copied (nothing at all when the cache holds this image version)."""
        settings = settings or JobSettings()
        image = volume.GetImageData()
        if image is None:
            raise ValueError(f"{volume.GetName()} has no image data")
        if settings.axis is not None:
            slice_axes(settings.axis)
        vid = volume.GetID()
        key = (vid, int(image.GetMTime()), settings.modality, settings.window)
        cached = self._images.get(vid)
        raw = None if cached is not None and cached[0] == key else engine_volume_source(volume)

        def get() -> PreparedImage:
            again = self._images.get(vid)
            if raw is None:
                prepared = cached[1]
            elif again is not None and again[0] == key:
                prepared = again[1]  # another task of the same run normalised this version meanwhile
            else:
                # Cached with the default axis: normalising takes seconds, choosing an axis not.
                prepared = prepare_image(raw(), dataclasses.replace(settings, axis=None), what)
                self._images[vid] = (key, prepared)
            if settings.axis is not None and settings.axis != prepared.axis:
                prepared = dataclasses.replace(prepared, axis=int(settings.axis))
            return prepared

        return get

    def prepared_image(self, volume, settings: JobSettings | None = None, what: str = "image") -> PreparedImage:
        """The node's voxels prepared as `fob segment` prepares a file (`job.prepare_image`: modality,
        normalisation, slicing axis), cached per image version and settings."""
        return self.image_source(volume, settings, what)()

    def normalised_image(self, volume) -> np.ndarray:
        """The volume's voxels normalised to [0, 1] exactly as `fob segment` does."""
        return self.prepared_image(volume).normalised

    def support_slices(self, volume, segmentation, segment_id: str, axis: int | None = None) -> list[int]:
        """Slice indices along the axis where the segment is non-empty on `volume`'s grid."""
        return nonempty_slices(segment_mask(segmentation, segment_id, volume), self.slice_axis(volume, axis))

    def current_slice(self, volume, ras_world: tuple[float, float, float], axis: int | None = None) -> int:
        """Nearest slice index along the axis to a world RAS point (e.g. a slice view's centre)."""
        return slice_at_world_point(volume, ras_world, self.slice_axis(volume, axis))

    def view_slice(self, volume, views: dict[str, np.ndarray], axis: int | None = None,
                   preferred: str | None = None) -> tuple[str, int]:
        """(view name, slice index along the axis) of the 2D view that shows voxel slices along the job's
        axis, `preferred` (the view the user last worked in) first: the widget's "current slice", right
        whether the job slices along k, j or i and whichever of Red, Yellow, Green the user works in.
        views: {name: SliceToRAS 4x4 in world RAS}. Raises ValueError when no view qualifies."""
        return view_slice(volume, views, self.slice_axis(volume, axis), preferred)

    def slice_center(self, volume, index: int, axis: int | None = None) -> np.ndarray:
        """World RAS (3,) of the centre of slice `index` (where the widget jumps a view to show it)."""
        return slice_center_world(volume, self.slice_axis(volume, axis), int(index))

    def get_segmenter(self, name: str = "auto", device: str = "auto", checkpoint: str | None = None):
        """A cached segmenter (`FoBSegmentLib.segmenters.get_segmenter`), so SAM embeddings stay cached
        and re-segmenting a slice after an edit only reruns the decoder."""
        key = (name, device, checkpoint or "")
        if key not in self._segmenters:
            try:
                from FoBSegmentLib.segmenters import get_segmenter
            except ImportError:
                get_segmenter = None
            if get_segmenter is not None:
                self._segmenters[key] = get_segmenter(name, checkpoint=checkpoint or None, device=device)
            elif name in ("graphcut", "auto"):
                from FoBSegmentLib.segmenters.graphcut import GraphCutSegmenter

                self._segmenters[key] = GraphCutSegmenter()
            elif name == "grabcut":
                from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

                self._segmenters[key] = GrabCutSegmenter()
            else:
                raise ValueError(f"segmenter {name!r} is not available in this installation")
        return self._segmenters[key]

    # --- prompt point lists (see `point_lists`) -------------------------------------------------------

    def prompt_point_lists(self, volume, segmentation, segment_id: str, create: bool = True) -> dict[str, Any]:
        """{"background": node, "foreground": node} for a target segment, found by their attributes and
        reference to the segmentation (so they are found again after a scene reload), created if asked."""
        return point_lists.prompt_point_lists(self.scene, volume, segmentation, segment_id, create)

    def reviewed_slices(self, volume, segmentation, segment_id: str) -> list[int]:
        return point_lists.reviewed_slices(self.scene, segmentation, segment_id)

    def set_reviewed(
        self, volume, segmentation, segment_id: str, slices: list[int], reviewed: bool = True, axis: int | None = None
    ) -> None:
        """Mark slices reviewed (their points locked, never replaced by a new prediction) or not."""
        ax = self.slice_axis(volume, axis)
        point_lists.set_reviewed(self.scene, volume, segmentation, segment_id, slices, reviewed, ax)

    def absent_slices(self, volume, segmentation, segment_id: str, axis: int | None = None,
                      current: np.ndarray | None = None) -> list[int]:
        """Slices marked as not showing the organ (`mark_absent`) along `axis` (default: the volume's
        axial axis) that the segment leaves empty: drawing the organ there again, or undoing the mark's
        clearing, lifts a mark. current: the segment's [k, j, i] mask when the caller has it."""
        ax = self.slice_axis(volume, axis)
        marked = point_lists.absent_slices(self.scene, segmentation, segment_id, ax)
        if not marked:
            return []
        current = segment_mask(segmentation, segment_id, volume) if current is None else current
        return [z for z in marked if z < current.shape[ax] and not take_slice(current, ax, z).any()]

    def mark_absent(self, volume, segmentation, segment_id: str, z: int, segmenter: str = "auto",
                    device: str = "auto", axis: int | None = None, checkpoint: str | None = None
                    ) -> dict[int, np.ndarray]:
        """"The organ is not on slice z" (e.g. the chain ran past its end): `begin_mark_absent` +
        `apply_segment` on the calling thread. Returns {slice: mask} of the slices written."""
        task = self.begin_mark_absent(volume, segmentation, segment_id, z, segmenter, device, axis, checkpoint)
        return self.apply_segment(task, task.compute())

    def begin_mark_absent(self, volume, segmentation, segment_id: str, z: int, segmenter: str = "auto",
                          device: str = "auto", axis: int | None = None, checkpoint: str | None = None,
                          refine: str | None = None) -> worker.SegmentTask:
        """Main thread: the task that marks slice z (along `axis`) as not showing the organ. Applied, it
        clears slice z and every slice chained from it (the propagation record replayed without z's
        points, as `fob segment --prompts-in` clears a slice whose points were all removed), removes
        z's points and keeps the mark: later propagations pass it to the job as an annotated absence
        (`fob segment --absent-slices`), so no chain runs past it. A slice drawn by the person is
        refused (ValueError): erase the drawing instead."""
        ax = self.slice_axis(volume, axis)
        z = int(z)
        current = segment_mask(segmentation, segment_id, volume)
        n = current.shape[ax]
        if not 0 <= z < n:
            raise ValueError(f"slice {z} is outside 0..{n - 1}")
        record = self._replayable_record(segmentation, segment_id, ax)
        # Without a record, every slice holding the organ is a drawn one (the support of a propagation).
        drawn = {int(a) for a in record["annotated"]} if record is not None else set(range(n))
        if z in drawn and take_slice(current, ax, z).any():
            raise ValueError(f"slice {z} is an annotated slice: erase the organ there with the Segment Editor "
                             "instead of marking it absent")

        def mark() -> None:
            point_lists.set_reviewed(self.scene, volume, segmentation, segment_id, [z], False, ax)
            empty = np.zeros((0, 2))
            point_lists.show_prompts(self.scene, volume, segmentation, segment_id, {z: PromptSet(empty, empty)}, ax)
            point_lists.add_absent(self.scene, volume, segmentation, segment_id, [z], ax)

        if record is not None and z in {int(e["index"]) for e in record["slices"]}:
            task = self.begin_segment(volume, segmentation, segment_id, [z], segmenter, device, ax, checkpoint,
                                      without=(z,), refine=refine)
        else:
            cleared = np.zeros_like(take_slice(current, ax, z))
            task = worker.SegmentTask(volume.GetID(), segmentation.GetID(), segment_id, ax, [z],
                                      lambda progress=None, cancel=None: worker.SegmentOutcome({z: cleared}))
        task.on_apply = mark
        return task

    def show_prompts(
        self, volume, segmentation, segment_id: str, prompts_by_slice: dict[int, PromptSet], axis: int | None = None
    ) -> dict[int, PromptSet]:
        """Put predicted prompts into the point lists, replacing the unlocked points of those slices.

        Reviewed (locked) slices keep their points. Returns the prompts actually shown.
        """
        ax = self.slice_axis(volume, axis)
        return point_lists.show_prompts(self.scene, volume, segmentation, segment_id, prompts_by_slice, ax)

    def read_prompts(
        self, volume, segmentation, segment_id: str, axis: int | None = None, slices: list[int] | None = None
    ) -> dict[int, PromptSet]:
        """The (possibly edited) prompts of the point lists, {slice: PromptSet in (x, y) pixels}.

        A point's slice is the nearest voxel slice to its current position (a dragged point moves with
        it); hidden points are not used. Raises ValueError for a point outside the volume.
        """
        ax = self.slice_axis(volume, axis)
        return point_lists.read_prompts(self.scene, volume, segmentation, segment_id, ax, slices)

    def export_prompts(
        self, path: str | os.PathLike, volume, segmentation, segment_id: str, axis: int | None = None
    ) -> None:
        """Write the point lists' prompts to a `.mrk.json` the CLI reads (`fob segment --prompts-in`).

        Positions are in the volume's local frame (LPS), i.e. the file matches the volume file on disk.
        """
        ax = self.slice_axis(volume, axis)
        point_lists.export_prompts(path, self.scene, volume, segmentation, segment_id, ax)

    def import_prompts(
        self, path: str | os.PathLike, volume, segmentation, segment_id: str, axis: int | None = None
    ) -> dict[int, PromptSet]:
        """Load prompts from a `.mrk.json` (e.g. `fob segment --prompts-out`) into the point lists."""
        ax = self.slice_axis(volume, axis)
        return point_lists.import_prompts(path, self.scene, volume, segmentation, segment_id, ax)

    def point_list_axis(self, point_list, volume=None) -> int:
        """The array axis a prompt list is sliced along: the axis its prompts were placed along, else the
        module's `sliceAxis` parameter, else the volume's axial axis (the axis to re-segment along)."""
        volume = point_lists.point_list_volume(point_list, volume)
        node = self.parameter_node(create=False)
        fallback = read_parameters(node).sliceAxis if node is not None else None
        return point_lists.point_list_axis(point_list, volume, fallback)

    def control_point_slice(self, point_list, index: int, volume=None) -> int | None:
        """The slice index, along the list's axis (`point_list_axis`), of control point `index`: the slice
        to re-segment after that point was moved or added. None while the point is being placed or when it
        lies outside the volume. volume: default the list's volume reference."""
        volume = point_lists.point_list_volume(point_list, volume)
        return point_lists.control_point_slice(point_list, index, volume, self.point_list_axis(point_list, volume))

    def control_point_slices(self, point_list, volume=None) -> point_lists.PointSnapshot:
        """{control point ID: (slice or None, world RAS position)} of a list, to diff with `edited_slices`."""
        volume = point_lists.point_list_volume(point_list, volume)
        return point_lists.control_point_slices(point_list, volume, self.point_list_axis(point_list, volume))

    @staticmethod
    def edited_slices(before: point_lists.PointSnapshot, after: point_lists.PointSnapshot) -> list[int]:
        """Slices whose prompts changed between two `control_point_slices` snapshots: the old and new
        slice of each moved point, the slice of each added or removed one."""
        return point_lists.edited_slices(before, after)

    # --- undo ----------------------------------------------------------------------------------------

    def _history(self, segmentation):
        key = segmentation.GetID()
        hist = self._histories.get(key)
        if hist is None or hist.GetSegmentation() is not segmentation.GetSegmentation():
            hist = slicer.vtkSegmentationHistory()
            hist.SetMaximumNumberOfStates(self.max_undo_states)
            hist.SetSegmentation(segmentation.GetSegmentation())
            self._histories[key] = hist
            self._undo_marks[key] = UndoMarks()
        return hist

    def save_state_for_undo(self, segmentation) -> None:
        """One undo state, taken before a user action modifies the segmentation: in the Logic's own
        history (what `undo` restores) and, when given, through `undo_callback(segmentation)` (the widget
        passes the Segment Editor's `saveStateForUndo`, so the step is also in the editor's own Undo)."""
        hist = self._history(segmentation)
        hist.SaveState()
        self._undo_marks[segmentation.GetID()].saved(segmentation_fingerprint(segmentation), self.max_undo_states)
        if self.undo_callback is not None:
            self.undo_callback(segmentation)
        if self.scene.GetUndoFlag():
            self.scene.SaveStateForUndo()

    def _wrote(self, segmentation) -> None:
        """Record the segmentation as FoB's last write left it (see `undo`)."""
        marks = self._undo_marks.get(segmentation.GetID())
        if marks is not None and marks.after and marks.after[-1] != TAINTED:
            marks.after[-1] = segmentation_fingerprint(segmentation)
            marks.redo.clear()

    def _check_unchanged(self, segmentation) -> None:
        """Before a further write of the same action (a live run's next slice): when something else changed
        the segmentation since FoB's previous write, the action's undo state predates that edit and
        restoring it would discard it; the action can no longer be undone by FoB."""
        marks = self._undo_marks.get(segmentation.GetID())
        if marks is not None and marks.after and marks.after[-1] != segmentation_fingerprint(segmentation):
            marks.after[-1] = TAINTED

    def can_undo(self, segmentation) -> tuple[bool, str]:
        """(whether `undo` would restore the state before FoB's last action, the reason when not)."""
        hist = self._history(segmentation)
        marks = self._undo_marks[segmentation.GetID()]
        if not hist.IsRestorePreviousStateAvailable() or not marks.after:
            return False, "nothing to undo"
        if marks.after[-1] == TAINTED or marks.after[-1] != segmentation_fingerprint(segmentation):
            return False, (
                f"{segmentation.GetName()} was changed after FoB's last action (e.g. in the Segment Editor); "
                "FoB's Undo would discard that work: use the Segment Editor's Undo instead"
            )
        return True, ""

    def undo(self, segmentation) -> bool:
        """Undo the last FoB action on the segmentation (the Logic's own history); False when there is none.

        Raises ValueError, changing nothing, when the segmentation was changed since FoB's last write
        (painted in the Segment Editor, another segment added, the editor's own Undo used): restoring
        FoB's state would silently discard that work.
        """
        ok, why = self.can_undo(segmentation)
        if not ok:
            if why == "nothing to undo":
                return False
            raise ValueError(why)
        hist = self._history(segmentation)
        if not hist.RestorePreviousState():
            return False
        marks = self._undo_marks[segmentation.GetID()]
        before = marks.before.pop()
        marks.redo.append((before, marks.after.pop()))
        marks.restored = segmentation_fingerprint(segmentation)
        # The restored state is what the segmentation was before the action. It is the previous FoB action's
        # result only if nothing was edited in between; else undoing that one too would discard the edit.
        if marks.after:
            marks.after[-1] = marks.restored if marks.after[-1] == before else TAINTED
        return True

    def redo(self, segmentation) -> bool:
        """Redo the FoB action `undo` took back; False when there is none or the segmentation changed since."""
        hist = self._history(segmentation)
        marks = self._undo_marks[segmentation.GetID()]
        if not hist.IsRestoreNextStateAvailable() or not marks.redo:
            return False
        if marks.restored != segmentation_fingerprint(segmentation):
            return False
        if not hist.RestoreNextState():
            return False
        marks.redo.pop()
        marks.before.append(marks.restored)  # what the redone action now starts from
        marks.after.append(segmentation_fingerprint(segmentation))
        return True

    def release(self) -> None:
        """Free what the Logic holds for the current scene (call on scene close): the prepared float32
        volume copies, the undo histories, the segmenters (SAM models and their embeddings) and the FoB
        generators; the GPU memory torch cached for them is returned to the driver."""
        for hist in self._histories.values():
            hist.RemoveAllStates()
        self._histories.clear()
        self._undo_marks.clear()
        self._images.clear()
        self._segmenters.clear()
        self._generators.clear()
        import gc
        import sys

        gc.collect()
        torch = sys.modules.get("torch")  # never imported here just to free memory
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def write_slices(
        self, volume, segmentation, segment_id: str, masks: dict[int, np.ndarray], axis: int | None = None,
        undo_state: bool = True,
    ) -> None:
        """Replace slices of one segment with (H, W) masks; one undo state for the whole call (none with
        undo_state=False: the caller saved the state of a larger action)."""
        if not masks:
            return
        ax = self.slice_axis(volume, axis)
        current = segment_mask(segmentation, segment_id, volume)
        edit = write_binary_slices(current, ax, masks)
        if edit.changed_voxels() == 0:
            return
        if undo_state:
            self.save_state_for_undo(segmentation)
        changed = {z: m for z, m in edit.after.items() if not np.array_equal(m, edit.before[z])}
        self._put(volume, segmentation, segment_id, ax, changed, current)
        self._wrote(segmentation)

    def _put(self, volume, segmentation, segment_id: str, axis: int, masks: dict[int, np.ndarray],
             whole: np.ndarray | None = None) -> None:
        """Write slices of one segment (no undo state): through the Segment Editor's masking when set
        (and restricting something), slice by slice; else in one write of `whole` (the segment with the
        slices already put) when given, else slice by slice."""
        if self.masking is not None and not self.masking.everywhere:
            with segment_editor_logic(self.masking, segmentation, volume) as editor:
                if editor is not None:
                    for z, m in sorted(masks.items()):
                        set_segment_slice_masked(editor, segmentation, segment_id, volume, axis, z, m)
                    return
        if whole is not None:
            set_segment_mask(segmentation, segment_id, volume, whole)
        else:
            for z, m in sorted(masks.items()):
                set_segment_slice(segmentation, segment_id, volume, axis, z, m)

    # --- segmenting ----------------------------------------------------------------------------------

    def segment_slices(
        self,
        volume,
        segmentation,
        segment_id: str,
        slices: list[int] | None = None,
        segmenter: str = "auto",
        device: str = "auto",
        axis: int | None = None,
        checkpoint: str | None = None,
        refine: str | None = None,
    ) -> dict[int, np.ndarray]:
        """Segment slices with the prompts in the point lists and write them into the segment.

        When the lists carry a propagation record (they were filled by a prediction or a propagation, or
        imported from `fob segment --prompts-out`), the record is replayed as `fob segment --prompts-in`
        does: `slices` get the masks the replay gives them, and the slices the segment already holds that
        were chained from an edited slice are propagated again; nothing else changes. Without a record
        each slice is segmented from its points alone. refine: `fob segment --refine` (None or "none":
        the segmenter's outlines stand).
        slices: None = all reviewed slices (all slices with prompts when none is reviewed). Returns
        {slice: (H, W) bool mask} of the slices written. One undo state; other segments are untouched.

        begin_segment (main thread) + task.compute (any thread; the widget's worker) + apply_segment
        (main thread), on the calling thread.
        """
        task = self.begin_segment(volume, segmentation, segment_id, slices, segmenter, device, axis, checkpoint,
                                  refine=refine)
        return self.apply_segment(task, task.compute())

    def begin_segment(
        self,
        volume,
        segmentation,
        segment_id: str,
        slices: list[int] | None = None,
        segmenter: str = "auto",
        device: str = "auto",
        axis: int | None = None,
        checkpoint: str | None = None,
        without: tuple[int, ...] = (),
        refine: str | None = None,
    ) -> worker.SegmentTask:
        """Main thread: read the prompts, the record and the segment out of MRML (see `segment_slices`);
        the returned task's `compute(progress=None, cancel=None)` normalises the volume, loads the
        segmenter and segments without touching MRML. Bad input raises ValueError here, before any work.
        without: slices whose points count as removed (`begin_mark_absent` removes them when applied)."""
        from FoBSegmentLib.propagation import PropagationCancelled

        ax = self.slice_axis(volume, axis)
        prompts = {z: ps for z, ps in self.read_prompts(volume, segmentation, segment_id, ax).items()
                   if z not in without}
        record = self._replayable_record(segmentation, segment_id, ax)
        recorded = {int(e["index"]) for e in record["slices"]} if record is not None else set()
        if slices is None:
            reviewed = self.reviewed_slices(volume, segmentation, segment_id)
            slices = reviewed or sorted(prompts)
        slices = [int(s) for s in slices]
        missing = [s for s in slices if s not in prompts and s not in recorded]
        if missing:
            raise ValueError(f"no prompts on slice(s) {', '.join(map(str, missing))}; predict or place points first")
        settings = self.job_settings(axis=ax, segmenter=segmenter, device=device, checkpoint=checkpoint, refine=refine)
        image = self.image_source(volume, settings)
        current = segment_mask(segmentation, segment_id, volume) if record is not None else None
        absent = ([a for a in self.absent_slices(volume, segmentation, segment_id, ax, current) if a not in without]
                  if record is not None else [])

        def compute(progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> worker.SegmentOutcome:
            if record is not None:
                return self._replay(image(), current, prompts, record, settings, absent, slices, progress, cancel)
            normalised = image().normalised
            seg = self.get_segmenter(segmenter, device, checkpoint)
            refiner = self.get_segmenter(settings.refine, device) if settings.refine else None
            masks = {}
            for n, s in enumerate(slices):
                if cancel is not None and cancel():
                    raise PropagationCancelled("cancelled")
                try:
                    masks[s] = np.asarray(seg.segment(take_slice(normalised, ax, s), prompts[s]).mask, bool)
                    if refiner is not None:
                        masks[s] = refine_slice(refiner, take_slice(normalised, ax, s), masks[s])[0]
                except ValueError as exc:
                    raise ValueError(f"slice {s}: {exc}") from None
                if progress is not None:
                    progress(n + 1, len(slices), f"slice {s}")
            choice = getattr(seg, "auto_choice", None)
            return worker.SegmentOutcome(masks, notes=[choice] if choice else [])

        return worker.SegmentTask(volume.GetID(), segmentation.GetID(), segment_id, ax, slices, compute)

    def apply_segment(self, task: worker.SegmentTask, outcome: worker.SegmentOutcome) -> dict[int, np.ndarray]:
        """Main thread: write a computed `SegmentTask` (one undo state), show the points a replay moved
        and store its record. Returns the masks written."""
        volume = self.scene.GetNodeByID(task.volume_id)
        segmentation = self.scene.GetNodeByID(task.segmentation_id)
        if volume is None or segmentation is None:
            raise ValueError("the volume or segmentation being segmented was removed from the scene")
        if task.on_apply is not None:
            task.on_apply()
        self.write_slices(volume, segmentation, task.segment_id, outcome.masks, task.axis)
        if outcome.prompts:
            self.show_prompts(volume, segmentation, task.segment_id, outcome.prompts, task.axis)
        if outcome.record is not None:
            point_lists.set_propagation_record(self.scene, volume, segmentation, task.segment_id, outcome.record)
        return outcome.masks

    def _replayable_record(self, segmentation, segment_id: str, axis: int) -> dict | None:
        """The point lists' propagation record if this Logic can replay it along `axis`; None for none,
        another axis, or another patient's support (which the Logic does not hold)."""
        record = point_lists.propagation_record(self.scene, segmentation, segment_id)
        if record is not None and (int(record["axis"]) != axis or not record.get("sameVolume", True)):
            return None
        return record

    def _replay(self, query: PreparedImage, current: np.ndarray, prompts: dict[int, PromptSet], record: dict,
                settings: JobSettings, absent: list[int], asked: list[int],
                progress: ProgressCallback | None = None, cancel: CancelCheck | None = None) -> worker.SegmentOutcome:
        """Replay the lists' propagation record with their current points (see `segment_slices`); no MRML.
        current: the segment on the volume's [k, j, i] grid when the task began; absent: the slices
        marked as not showing the organ (no re-chained slice passes them). Written: the `asked` slices
        and the slices the segment already holds whose mask the replay changed (those chained from an
        edited slice); a slice of a record whose masks were never written (a prediction, an imported
        file) waits until it is asked for."""
        from FoBSegmentLib.propagation.document import prompt_fingerprint

        support = np.zeros_like(current)
        for z in record["annotated"]:
            put_slice(support, query.axis, int(z), take_slice(current, query.axis, int(z)))
        comps = load_components(settings, replaying=True,
                                segmenter=self.get_segmenter(settings.segmenter, settings.device, settings.sam_checkpoint),
                                refiner=self._refiner(settings))
        job = build_job(query, support, settings, components=comps, support_name="the annotated slices",
                        absent_slices=absent)
        result = job.with_prompts(prompts, record).run(progress=progress, cancel=cancel)
        annotated = {int(z) for z in record["annotated"]}
        touched = ({int(e["index"]) for e in record["slices"]} | set(result.order)) - annotated
        masks = {z: take_slice(result.mask, query.axis, z).astype(bool) for z in sorted(touched)}
        changed = {z: m for z, m in masks.items() if not np.array_equal(m, take_slice(current, query.axis, z))
                   and (z in asked or take_slice(current, query.axis, z).any())}
        old = {int(e["index"]): e["prompts"] for e in record["slices"]}
        redone = {z: ps for z, ps in result.prompts.items() if old.get(z) != prompt_fingerprint(ps)}
        return worker.SegmentOutcome(changed, redone, result.record, list(job.notes))

    # --- prediction and propagation -----------------------------------------------------------------

    @staticmethod
    def settings_from_parameters(p) -> dict[str, Any]:
        """The `prepare_propagation` settings of the module's parameters (a `FoBParameters` or the
        widget's parameter node wrapper, which has the same fields)."""
        return dict(
            axis=p.sliceAxis,
            slice_range=(p.sliceStart, p.sliceStop) if p.sliceStart >= 0 and p.sliceStop >= 0 else None,
            prompts_from=p.promptSource,
            model=p.model,
            segmenter=p.segmenter,
            device=p.device,
            checkpoint=p.checkpoint or None,
            n_background=p.numBackgroundPoints,
            n_foreground=p.numForegroundPoints,
            refine=p.refine,
        )

    def job_settings(
        self,
        axis: int | None = None,
        slice_range: tuple[int, int] | None = None,
        prompts_from: str = "auto",
        model: str = "",
        segmenter: str = "auto",
        device: str = "auto",
        config=None,
        checkpoint: str | None = None,
        n_background: int | None = None,
        n_foreground: int | None = None,
        refine: str | None = None,
    ) -> JobSettings:
        """The module's settings as the engine's `JobSettings` (-1 / "" mean automatic / default;
        refine "none" or None: no refiner)."""
        cfg = dataclasses.replace(config) if config is not None else PropagationConfig()
        if n_background is not None:
            cfg.n_background = int(n_background)
        if n_foreground is not None:
            cfg.n_foreground = int(n_foreground)
        slices = (int(slice_range[0]), int(slice_range[1])) if slice_range is not None and min(slice_range) >= 0 else "auto"
        return JobSettings(prompts_from=prompts_from, model=model or None, device=device, segmenter=segmenter,
                           sam_checkpoint=checkpoint or None, axis=axis if axis is not None and axis >= 0 else None,
                           slices=slices, config=cfg, refine=parse_refine(refine))

    def _refiner(self, settings: JobSettings):
        """The settings' outline refiner, cached as the segmenters are (None without one)."""
        return self.get_segmenter(settings.refine, settings.device) if settings.refine else None

    def _components(self, settings: JobSettings, generator=None):
        """Generator and segmenter for `settings`, cached (SAM embeddings and the FoB model stay loaded)."""
        key = (settings.model or "", settings.device)
        if generator is None and settings.prompts_from != "neighbour":
            generator = self._generators.get(key)
        comps = load_components(settings, generator=generator,
                                segmenter=self.get_segmenter(settings.segmenter, settings.device, settings.sam_checkpoint),
                                refiner=self._refiner(settings))
        if comps.generator is not None:
            self._generators[key] = comps.generator
        return comps

    def prepare_propagation(self, volume, segmentation, segment_id: str, **kwargs) -> PropagationJob:
        """`begin_propagation(...)()` on the calling thread (scripts, tests)."""
        return self.begin_propagation(volume, segmentation, segment_id, **kwargs)()

    def begin_propagation(
        self,
        volume,
        segmentation,
        segment_id: str,
        support_volume=None,
        support_segmentation=None,
        support_segment_id: str | None = None,
        generator=None,
        **settings_kwargs,
    ) -> Callable[[], PropagationJob]:
        """Main thread: copy what a propagation needs out of MRML; returns build() that builds the job with
        the engine's one job builder (`job.build_job`), exactly as `fob segment` does. build() normalises
        the volume and loads the model and the segmenter (seconds: the widget calls it on its worker) and
        touches no MRML. The support is the segment itself (same volume) or another volume's segment
        (cross-patient). Bad input raises ValueError here.

        settings_kwargs: see `job_settings`. generator: an already loaded FoB generator (anything with
        `.predict(support_image, support_mask, query_image) -> PromptSet`); otherwise the settings'
        model (a file) or the shipped default is loaded.
        """
        settings = self.job_settings(**settings_kwargs)
        query = self.image_source(volume, settings)
        same_volume = support_volume is None or support_volume is volume
        support = None
        if same_volume:
            s_mask = segment_mask(support_segmentation or segmentation, support_segment_id or segment_id, volume)
        else:
            if support_segmentation is None or not support_segment_id:
                raise ValueError("a support volume needs its segmentation and segment")
            support = self.image_source(support_volume, dataclasses.replace(settings, axis=None), "support image")
            s_mask = segment_mask(support_segmentation, support_segment_id, support_volume)
        if not s_mask.any():
            raise ValueError("the support segment is empty: outline the organ on at least one slice")
        ids = (volume.GetID(), segmentation.GetID(), segment_id)
        absent = self.absent_slices(volume, segmentation, segment_id, settings.axis, s_mask) if same_volume else []
        # The points shown by a prediction (or an earlier propagation), as edited since: when the job
        # built below is the one that made them, it replays them (`Job.replaying_edits`).
        record, shown = None, {}
        if same_volume:
            ax = self.slice_axis(volume, settings.axis)
            record = self._replayable_record(segmentation, segment_id, ax)
            shown = self.read_prompts(volume, segmentation, segment_id, ax) if record is not None else {}

        def build() -> PropagationJob:
            engine = build_job(query(), s_mask, settings, support=support() if support is not None else None,
                               components=self._components(settings, generator), support_name="the support segment",
                               absent_slices=absent)
            return PropagationJob(*ids, engine.replaying_edits(shown, record))

        return build

    # Worker-thread computations (no MRML; see `worker`), static so the widget runs them on its thread.
    run_propagation = staticmethod(worker.run_propagation)

    def _job_nodes(self, job: PropagationJob):
        volume = self.scene.GetNodeByID(job.volume_id)
        segmentation = self.scene.GetNodeByID(job.segmentation_id)
        if volume is None or segmentation is None:
            raise ValueError("the volume or segmentation of this propagation was removed from the scene")
        return volume, segmentation

    def apply_slice_result(self, job: PropagationJob, z: int, mask: np.ndarray) -> bool:
        """Main thread: write one slice of a running propagation into the job's segment (live display).

        Only that slice of that segment changes (other segments and slices keep their voxels, including
        edits made meanwhile). The first write of the job saves the one undo state of the whole run; later
        writes save none. A slice may be written again (the last write wins). Returns False when the
        slice already held exactly this mask (nothing written).
        """
        volume, segmentation = self._job_nodes(job)
        z, new = int(z), np.asarray(mask, bool)
        if job.live_before is None:
            current = segment_mask(segmentation, job.segment_id, volume)  # once per run: what a rollback restores
            if np.array_equal(take_slice(current, job.axis, z), new):
                return False
            self.save_state_for_undo(segmentation)
            job.live_before = current
        else:
            shown = job.live_shown.get(z)
            if np.array_equal(shown if shown is not None else take_slice(job.live_before, job.axis, z), new):
                return False
            self._check_unchanged(segmentation)
        # one slice's extent, not the volume: a live run must not rewrite 200 slices per slice
        self._put(volume, segmentation, job.segment_id, job.axis, {z: new})
        job.live_slices.add(z)
        job.live_shown[z] = new.copy()
        self._wrote(segmentation)
        return True

    def rollback_propagation(self, job: PropagationJob) -> bool:
        """Main thread, after a cancelled or failed live run: remove what `apply_slice_result` wrote.

        When nothing else changed the segmentation meanwhile this is an Undo of the run's single state
        (Redo brings the partial result back); otherwise (e.g. the user painted during the run) only the
        slices the run wrote get their previous voxels back, and the user's edits stay.
        Returns False when nothing had been written.
        """
        if job.live_before is None:
            return False
        volume, segmentation = self._job_nodes(job)
        before, written = job.live_before, sorted(job.live_slices)
        job.live_before, job.live_slices, job.live_shown = None, set(), {}
        if self.can_undo(segmentation)[0] and self.undo(segmentation):
            return True
        for z in written:
            set_segment_slice(segmentation, job.segment_id, volume, job.axis, z, take_slice(before, job.axis, z))
        return True

    # --- several organs in one go ----------------------------------------------------------------------

    def outlined_segments(self, volume, segmentation) -> list[str]:
        """IDs of the segmentation's segments that hold an outline (a non-empty mask on the volume's grid)."""
        seg = segmentation.GetSegmentation()
        ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
        return [sid for sid in ids if segment_mask(segmentation, sid, volume).any()]

    def begin_propagation_many(self, volume, segmentation, segment_ids: list[str],
                               **kwargs) -> Callable[[], list[PropagationJob]]:
        """Main thread: `begin_propagation` for each segment (each is its own support, propagated into
        itself); the returned build() builds every job (worker). The volume is normalised once."""
        if not segment_ids:
            raise ValueError("no segment holds an outline: outline at least one organ on one slice")
        builds = [self.begin_propagation(volume, segmentation, sid, **kwargs) for sid in segment_ids]
        return lambda: [build() for build in builds]

    @staticmethod
    def run_propagation_many(jobs: list[PropagationJob], progress: ProgressCallback | None = None,
                             cancel: CancelCheck | None = None) -> list:
        """Worker: run the jobs one after the other; progress counts the steps of all of them."""
        results = []
        for n, job in enumerate(jobs):
            name = f"segment {n + 1} of {len(jobs)}"

            def step(done: int, total: int, text: str = "", n: int = n, name: str = name) -> None:
                if progress is not None:
                    progress(n * total + done, len(jobs) * total, f"{name}: {text}")

            results.append(worker.run_propagation(job, step, cancel))
        return results

    def apply_propagation_many(self, jobs: list[PropagationJob], results: list) -> dict[str, list[int]]:
        """Main thread: write every segment's propagation as ONE undo step. Returns {segment id: slices}."""
        if not jobs:
            return {}
        _, segmentation = self._job_nodes(jobs[0])
        self.save_state_for_undo(segmentation)
        written = {job.segment_id: self.apply_propagation(job, result, undo_state=False)
                   for job, result in zip(jobs, results)}
        self._wrote(segmentation)
        return written

    def propagate_many(self, volume, segmentation, segment_ids: list[str] | None = None,
                       progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                       **kwargs) -> dict[str, Any]:
        """Propagate several organs in one go (scripts, tests): each outlined segment (default: every
        segment holding an outline) into itself, one undo step for the whole run. Returns {segment id:
        PropagationResult}. Cancelled or failed: nothing is written."""
        ids = self.outlined_segments(volume, segmentation) if segment_ids is None else list(segment_ids)
        jobs = self.begin_propagation_many(volume, segmentation, ids, **kwargs)()
        results = self.run_propagation_many(jobs, progress, cancel)
        self.apply_propagation_many(jobs, results)
        return {job.segment_id: result for job, result in zip(jobs, results)}

    def apply_propagation(self, job: PropagationJob, result, show_prompts: bool = True,
                          undo_state: bool = True) -> list[int]:
        """Write a finished propagation into its segment (one undo state) and show the prompts it used.

        Only slices the propagation produced are written; annotated slices stay as drawn. Returns them.
        After live writes (`apply_slice_result`) no second undo state is saved: the final, cleaned-up
        masks replace the live ones, and a live-written slice the result does not keep gets its
        previous voxels back, so the run is still one undo step.
        """
        volume, segmentation = self._job_nodes(job)
        produced = [z for z, r in sorted(result.slices.items()) if r.source not in ("skipped", "annotation")]
        masks = {z: take_slice(result.mask, job.axis, z).astype(bool) for z in produced}
        if job.live_before is None:
            self.write_slices(volume, segmentation, job.segment_id, masks, job.axis, undo_state)
        else:
            for z in job.live_slices - set(masks):
                masks[z] = take_slice(job.live_before, job.axis, z).astype(bool)
            self._check_unchanged(segmentation)
            current = segment_mask(segmentation, job.segment_id, volume)
            edit = write_binary_slices(current, job.axis, masks)
            changed = {z: m for z, m in edit.after.items() if not np.array_equal(m, edit.before[z])}
            if changed:
                self._put(volume, segmentation, job.segment_id, job.axis, changed, current)
                self._wrote(segmentation)
            job.live_before, job.live_slices, job.live_shown = None, set(), {}
        if show_prompts and result.prompts:
            self.show_prompts(volume, segmentation, job.segment_id, result.prompts, job.axis)
            point_lists.set_propagation_record(self.scene, volume, segmentation, job.segment_id, result.record)
        return produced

    def propagate(
        self,
        volume,
        segmentation,
        segment_id: str,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        live: bool = False,
        on_slice: SliceCallback | None = None,
        **kwargs,
    ):
        """prepare + run + apply on the calling thread (scripts and tests); returns the PropagationResult.

        live=True writes each slice as soon as it is segmented (`apply_slice_result`, as the widget does
        from its queue), then calls on_slice(z, mask) if given; still one undo step. A cancelled or failed
        live run is rolled back (`rollback_propagation`) before the exception propagates.
        """
        job = self.prepare_propagation(volume, segmentation, segment_id, **kwargs)
        hook = None
        if live:

            def hook(z: int, mask: np.ndarray) -> None:
                self.apply_slice_result(job, z, mask)
                if on_slice is not None:
                    on_slice(z, mask)

        elif on_slice is not None:
            hook = on_slice
        try:
            result = self.run_propagation(job, progress, cancel, on_slice=hook)
        except BaseException:
            self.rollback_propagation(job)
            raise
        self.apply_propagation(job, result)
        return result

    def predict_prompts(
        self,
        volume,
        segmentation,
        segment_id: str,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        **kwargs,
    ) -> dict[int, PromptSet]:
        """Predict prompts for the slices of the range and show them for review; commits no segmentation.

        prepare_propagation + run_propagation + show_job_prompts on the calling thread (the widget runs
        the propagation on its worker). Returns the prompts shown (reviewed slices keep their points).
        """
        job = self.prepare_propagation(volume, segmentation, segment_id, **kwargs)
        return self.show_job_prompts(job, self.run_propagation(job, progress, cancel))

    def show_job_prompts(self, job: PropagationJob, result) -> dict[int, PromptSet]:
        """Main thread: show the prompts a job's slices received, without writing its masks, and store its
        record: the preview is the propagation itself, so Segment replays it with the points as edited,
        exactly as `fob segment --prompts-in` does (see `segment_slices`), and Export writes a file the
        command line turns into the same mask. Returns the prompts shown (reviewed slices keep theirs)."""
        volume, segmentation = self._job_nodes(job)
        annotated = {s.index for s in job.supports} if job.same_volume else set()
        prompts = {z: p for z, p in result.prompts.items() if z not in annotated}
        shown = self.show_prompts(volume, segmentation, job.segment_id, prompts, job.axis)
        point_lists.set_propagation_record(self.scene, volume, segmentation, job.segment_id, result.record)
        return shown
