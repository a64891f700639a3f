"""The module's parameters, defined once for the Logic and for the widget's parameterNodeWrapper.

`FoBParameters` is the definition: each field's name, type, default and (for integers) inclusive range.
The Logic reads and writes it on a `vtkMRMLScriptedModuleNode` (`read_parameters`, `write_parameters`);
the widget builds its `parameterNodeWrapper` class from it (`wrapper_class_body`), adding the node
references of `NODE_REFERENCES`. Both store each value under its field name as the wrapper's
serialisers do (`str(int)`, plain strings), so a scene saved by one is read by the other.

No Slicer import here: this module is imported by the widget before the engine's packages are installed,
and by tests without the slicer-core wheel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any

MODULE_NAME = "FoBSegment"

# Slice indices are counted along the job's axis; -1 means "automatic". The upper bound only keeps the
# wrapper from giving the spin boxes a +-2**31 range: no volume in practice has this many slices.
MAX_SLICE_INDEX = 99_999

# Node references of the parameter node: role -> MRML class. The widget binds them to node selectors;
# the Logic stores them with `FoBSegmentLogic.set_parameters(..., inputVolume=node, ...)`.
NODE_REFERENCES: dict[str, str] = {
    "inputVolume": "vtkMRMLScalarVolumeNode",
    "segmentation": "vtkMRMLSegmentationNode",
    "supportVolume": "vtkMRMLScalarVolumeNode",
    "supportSegmentation": "vtkMRMLSegmentationNode",
}


def _int(default: int, lo: int, hi: int, doc: str) -> Any:
    return field(default=default, metadata={"range": (lo, hi), "doc": doc})


def _str(default: str, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class FoBParameters:
    """The module's settings (see each field's `metadata["doc"]`; integer fields carry their range)."""

    segmentID: str = _str("", "target segment of `segmentation`")
    supportSegmentID: str = _str("", "support segment of `supportSegmentation` (cross-patient support)")
    sliceAxis: int = _int(-1, -1, 2, "array axis of [k, j, i] to slice along; -1 = the volume's axial axis")
    sliceStart: int = _int(-1, -1, MAX_SLICE_INDEX, "first slice of the range; -1 = automatic")
    sliceStop: int = _int(-1, -1, MAX_SLICE_INDEX, "last slice of the range, inclusive; -1 = automatic")
    model: str = _str("", "FoB model file; empty = the shipped default (if any)")
    checkpoint: str = _str("", "local segmenter checkpoint; empty = the registry's cached download")
    promptSource: str = _str("auto", "auto | fob | neighbour | hybrid")
    segmenter: str = _str("auto", "a FoBSegmentLib.segmenters name (graphcut, grabcut, sam-vit-b, ..., auto)")
    refine: str = _str("none", "none | litemedsam: the model that redraws each chained slice's outline")
    device: str = _str("auto", "auto | cpu | cuda")
    numBackgroundPoints: int = _int(16, 3, 64, "background (ring) points per slice")
    numForegroundPoints: int = _int(4, 0, 16, "foreground points per slice")


@dataclass(frozen=True)
class Masking:
    """The Segment Editor's masking settings FoB's writes follow (`FoBSegmentLogic.masking`), read from a
    `vtkMRMLSegmentEditorNode` by the widget. Values are that node's enums: mask_mode
    (vtkMRMLSegmentationNode.EditAllowedEverywhere = 0, InsideAllSegments, InsideVisibleSegments,
    OutsideAllSegments, OutsideVisibleSegments, InsideSingleSegment with mask_segment_id),
    overwrite_mode (OverwriteAllSegments = 0, OverwriteVisibleSegments = 1, OverwriteNone = 2),
    intensity_range (low, high) of the source volume, None = no intensity mask."""

    mask_mode: int = 0
    mask_segment_id: str = ""
    overwrite_mode: int = 2
    intensity_range: tuple[float, float] | None = None

    @classmethod
    def from_editor_node(cls, node) -> Masking:
        rng = None
        if node.GetSourceVolumeIntensityMask():
            rng = tuple(float(v) for v in node.GetSourceVolumeIntensityMaskRange())
        return cls(int(node.GetMaskMode()), node.GetMaskSegmentID() or "", int(node.GetOverwriteMode()), rng)

    @property
    def everywhere(self) -> bool:
        """True when these settings restrict nothing (FoB's plain write gives the same result)."""
        return self.mask_mode == 0 and self.overwrite_mode == 2 and self.intensity_range is None


def _parse(f, text: str) -> int | str | None:
    """The field's value from its stored text, None when unparsable or out of range."""
    if f.type in ("int", int):
        try:
            value = int(text)
        except ValueError:
            return None
        lo, hi = f.metadata.get("range", (value, value))
        return value if lo <= value <= hi else None
    return str(text)


def read_parameters(node) -> FoBParameters:
    """FoBParameters from a parameter node; missing, unparsable or out-of-range values keep their defaults."""
    params = FoBParameters()
    for f in fields(FoBParameters):
        text = node.GetParameter(f.name)
        if not text:
            continue
        value = _parse(f, text)
        if value is not None:
            setattr(params, f.name, value)
    return params


def write_parameters(node, params: FoBParameters) -> None:
    """Store every field under its name (the text the widget's wrapper also writes)."""
    was = node.StartModify()
    try:
        for f in fields(FoBParameters):
            node.SetParameter(f.name, str(getattr(params, f.name)))
    finally:
        node.EndModify(was)


def wrapper_class_body(within_range: Callable[[int, int], Any], node_class: Callable[[str], type]) -> dict[str, Any]:
    """The namespace of the widget's parameterNodeWrapper class, built from `FoBParameters`.

    within_range: Slicer's `slicer.parameterNodeWrapper.WithinRange`; node_class: MRML class name -> class
    (e.g. `lambda name: getattr(slicer, name)`). Integer fields become `Annotated[int, within_range(lo, hi)]`,
    node references plain node-class annotations without a default, as the wrapper expects them.
    """
    annotations: dict[str, Any] = {role: node_class(cls) for role, cls in NODE_REFERENCES.items()}
    body: dict[str, Any] = {}
    types = {"int": int, "str": str, int: int, str: str}
    for f in fields(FoBParameters):
        kind = types[f.type]
        rng = f.metadata.get("range")
        annotations[f.name] = Annotated[kind, within_range(*rng)] if rng else kind
        body[f.name] = f.default
    body["__annotations__"] = annotations
    body["__doc__"] = "The FoBSegment parameter node, typed (generated from FoBSegmentLib.slicer.parameters)."
    return body


def find_parameter_node(scene, create: bool = True):
    """The scene's FoBSegment parameter node, the one Slicer's ScriptedLoadableModuleLogic.getParameterNode
    returns (singleton tag FoBSegment, attribute ModuleName = FoBSegment); created with defaults when missing."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is not None:
        return node
    nodes = scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if node.GetAttribute("ModuleName") == MODULE_NAME:
            return node
    if not create:
        return None
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # owned by the Python variable, as in Slicer's createParameterNode
    node.SetSingletonTag(MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    node.SetAttribute("ModuleName", MODULE_NAME)
    write_parameters(node, FoBParameters())
    return scene.AddNode(node)
