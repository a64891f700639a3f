"""Prompts <-> 3D Slicer markups point lists (`.mrk.json`), the file the module and the CLI share.

File layout (markups schema v1.0.3, loadable by Slicer's Markups module and `vtkSlicerMarkupsLogic.LoadMarkups`):

* one file, two "Fiducial" markups (point lists): ``name`` "FoB background" (red) and "FoB foreground" (green);
* ``coordinateSystem`` is always written as "LPS" (Slicer's own default for markups files), positions in mm;
* each control point has the label ``b<n>`` / ``f<n>`` and the description
  ``kind=background slice=<index> axis=<axis> x=<x> y=<y>``, so a file can be read without the image, and a point
  that was dragged or added in Slicer (plain label) is still classified by the list it sits in.

Frames: a PromptSet holds (x, y) = (column, row) pixels of the slice taken along array axis ``axis`` of the
``[k, j, i]`` array (see `FoBSegmentLib.io.coords.slice_axes`); the file holds LPS mm of the same points, computed
with the volume's `Geometry`. On reading, a point's slice is the nearest voxel slice along ``axis`` (its
position wins over the description, because a person may have moved it) and its (x, y) is the in-plane projection.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from FoBSegmentLib.atomic import write_text_atomic
from FoBSegmentLib.io.coords import (
    Geometry,
    check_inside_volume,
    ijk_to_slice_xy,
    lps_to_ras,
    slice_axes,
    slice_xy_to_ijk,
)
from FoBSegmentLib.prompts import PromptSet

SCHEMA_URL = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
KINDS = ("background", "foreground")
LIST_NAMES = {"background": "FoB background", "foreground": "FoB foreground"}
LABEL_PREFIX = {"background": "b", "foreground": "f"}
COLORS = {"background": (1.0, 0.15, 0.15), "foreground": (0.15, 0.9, 0.2)}
_SCHEMA_RE = re.compile(r"markups-schema-v1\.\d+\.\d+\.json")
_DESC_RE = re.compile(r"(\w+)=([^\s]+)")


def point_description(kind: str, slice_index: int, axis: int, xy: tuple[float, float]) -> str:
    """Machine-readable control point description: ``kind=... slice=... axis=... x=... y=...``.

    x and y are written exactly (shortest repr of the float64): a point that was not moved is read
    back with its exact pixel coordinates, which the propagation record's fingerprints rely on."""
    return f"kind={kind} slice={int(slice_index)} axis={int(axis)} x={float(xy[0])!r} y={float(xy[1])!r}"


# A point within this distance (pixels) of its description's (x, y), on its description's slice,
# was not moved: its exact described coordinates are used (LPS mm round trips lose the last bits).
SNAP_PX = 1e-3


def described_xy(description: str, axis: int, index: int, xy: np.ndarray) -> np.ndarray:
    """The exact (x, y) of a point's description when the point was not moved, else `xy`."""
    d = parse_point_description(description)
    try:
        if int(d["axis"]) != axis or int(d["slice"]) != index:
            return xy
        exact = np.array([float(d["x"]), float(d["y"])])
    except (KeyError, ValueError):
        return xy
    return exact if np.all(np.abs(exact - xy) <= SNAP_PX) else xy


def parse_point_description(text: str) -> dict[str, str]:
    """Key/value pairs of a description written by `point_description` (empty dict for free text)."""
    return dict(_DESC_RE.findall(text or ""))


def _display(kind: str) -> dict:
    color = list(COLORS[kind])
    return {
        "visibility": True,
        "opacity": 1.0,
        "color": color,
        "selectedColor": color,
        "pointLabelsVisibility": False,
        "textScale": 0.0,
        "glyphType": "Sphere3D",
        "glyphScale": 1.5,
        "sliceProjection": False,
    }


def prompts_to_markups_dict(
    prompts_by_slice: dict[int, PromptSet], geometry: Geometry, axis: int, record: dict | None = None
) -> dict:
    """The markups JSON document (a dict) for prompts on slices along `axis`; see the module docstring.
    record: the propagation record (`propagation.document`), stored under its own top-level key,
    which Slicer's markups reader ignores."""
    slice_axes(axis)
    n_slices = geometry.array_shape[axis]
    lists: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for index in sorted(prompts_by_slice):
        ps = prompts_by_slice[index]
        if not isinstance(ps, PromptSet):
            raise ValueError(f"slice {index}: expected a PromptSet, got {type(ps).__name__}")
        if not 0 <= int(index) < n_slices:
            raise ValueError(f"slice {index} is outside 0..{n_slices - 1} along axis {axis}")
        for kind in KINDS:
            pts = getattr(ps, kind)
            if len(pts) == 0:
                continue
            ijk = slice_xy_to_ijk(pts, axis, int(index))
            check_inside_volume(ijk, geometry, what=f"slice {index} {kind} prompt")
            lps = geometry.ijk_to_lps(ijk)
            for (x, y), pos in zip(pts, lps):
                n = len(lists[kind])
                lists[kind].append(
                    {
                        "id": str(n + 1),
                        "label": f"{LABEL_PREFIX[kind]}{n}",
                        "description": point_description(kind, int(index), axis, (float(x), float(y))),
                        "associatedNodeID": "",
                        "position": [float(v) for v in pos],
                        "selected": True,
                        "locked": False,
                        "visibility": True,
                        "positionStatus": "defined",
                    }
                )
    markups = []
    for kind in KINDS:
        markups.append(
            {
                "type": "Fiducial",
                "name": LIST_NAMES[kind],
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": f"{LABEL_PREFIX[kind]}%d",
                "lastUsedControlPointNumber": len(lists[kind]),
                "controlPoints": lists[kind],
                "measurements": [],
                "display": _display(kind),
            }
        )
    doc: dict = {"@schema": SCHEMA_URL, "markups": markups}
    if record is not None:
        from FoBSegmentLib.propagation.document import RECORD_KEY

        doc[RECORD_KEY] = record
    return doc


def write_prompt_markups(
    path: str | os.PathLike,
    prompts_by_slice: dict[int, PromptSet],
    geometry: Geometry,
    axis: int,
    record: dict | None = None,
) -> None:
    """Write prompts of several slices to one Slicer `.mrk.json` file (LPS), atomically, with the
    propagation record when given (then `fob segment --prompts-in` rebuilds the mask from it).

    prompts_by_slice: slice index along `axis` -> PromptSet in that slice's (x, y) pixels.
    Raises ValueError (and writes nothing) for a slice or point outside the volume.
    """
    doc = prompts_to_markups_dict(prompts_by_slice, geometry, axis, record)
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def _kind_of_markup(markup: dict) -> str | None:
    name = str(markup.get("name", "")).lower()
    for kind in KINDS:
        if kind in name:
            return kind
    return None


def _kind_of_point(point: dict, list_kind: str | None, where: str) -> str:
    # The list a point sits in decides (a person may add points in Slicer with default labels);
    # description and label only classify points of lists without a FoB name.
    if list_kind is not None:
        return list_kind
    kind = parse_point_description(str(point.get("description", ""))).get("kind")
    if kind in KINDS:
        return kind
    label = str(point.get("label", ""))
    for k in KINDS:
        if re.fullmatch(rf"{LABEL_PREFIX[k]}\d+", label):
            return k
    raise ValueError(f"{where}: cannot tell whether the point is background or foreground "
                     "(no FoB list name, description kind= or b<n>/f<n> label)")


def _position(point: dict, where: str) -> list[float]:
    pos = point.get("position")
    if not isinstance(pos, (list, tuple)) or len(pos) != 3:
        raise ValueError(f"{where}: 'position' must be a list of 3 numbers")
    try:
        vals = [float(v) for v in pos]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: 'position' must be a list of 3 numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"{where}: 'position' is not finite")
    return vals


def markups_dict_to_prompts(doc: object, geometry: Geometry, axis: int, name: str | None = None) -> dict[int, PromptSet]:
    """Inverse of `prompts_to_markups_dict`; accepts LPS or RAS files and points edited in Slicer.

    Points whose ``positionStatus`` is not "defined" are skipped (Slicer's placeholders). Raises ValueError
    for a malformed document or a point outside the volume (prefixed with `name`, the file's name, if given).
    """
    try:
        return _markups_dict_to_prompts(doc, geometry, axis)
    except ValueError as exc:
        if name is None:
            raise
        raise ValueError(f"{name}: {exc}") from None


def _markups_dict_to_prompts(doc: object, geometry: Geometry, axis: int) -> dict[int, PromptSet]:
    slice_axes(axis)
    if not isinstance(doc, dict) or not isinstance(doc.get("markups"), list):
        raise ValueError("not a Slicer markups file: no 'markups' list at the top level")
    schema = doc.get("@schema")
    if schema is not None and not _SCHEMA_RE.search(str(schema)):
        raise ValueError(f"unsupported markups schema {schema!r} (expected markups-schema-v1.x.y)")
    collected: dict[int, dict[str, list]] = {}
    for m_i, markup in enumerate(doc["markups"]):
        where_m = f"markup {m_i}"
        if not isinstance(markup, dict):
            raise ValueError(f"{where_m}: not an object")
        if markup.get("type") != "Fiducial":
            raise ValueError(f"{where_m}: type {markup.get('type')!r} is not a point list ('Fiducial')")
        system = markup.get("coordinateSystem", "LPS")  # Slicer reads a missing value as LPS
        if system not in ("LPS", "RAS"):
            raise ValueError(f"{where_m}: coordinateSystem {system!r} is neither 'LPS' nor 'RAS'")
        units = markup.get("coordinateUnits", "mm")
        if units != "mm" and not (isinstance(units, list) and units[:1] == ["mm"]):
            raise ValueError(f"{where_m}: coordinateUnits {units!r} are not millimetres")
        points = markup.get("controlPoints", [])
        if not isinstance(points, list):
            raise ValueError(f"{where_m}: 'controlPoints' is not a list")
        list_kind = _kind_of_markup(markup)
        for p_i, point in enumerate(points):
            where = f"{where_m} point {p_i}"
            if not isinstance(point, dict):
                raise ValueError(f"{where}: not an object")
            if point.get("positionStatus", "defined") != "defined":
                continue
            kind = _kind_of_point(point, list_kind, where)
            pos = np.asarray([_position(point, where)])
            lps = pos if system == "LPS" else lps_to_ras(pos)  # the flip is its own inverse
            ijk = geometry.lps_to_ijk(lps)
            label = point.get("label") or str(p_i)
            check_inside_volume(ijk, geometry, what=f"{kind} point {label!r} ({where})")
            xy, pos_along = ijk_to_slice_xy(ijk, axis)
            index = int(np.floor(pos_along[0] + 0.5))
            index = min(max(index, 0), geometry.array_shape[axis] - 1)
            xy0 = described_xy(str(point.get("description", "")), axis, index, xy[0])
            collected.setdefault(index, {k: [] for k in KINDS})[kind].append(xy0)
    return {
        index: PromptSet(
            background=np.asarray(v["background"]).reshape(-1, 2),
            foreground=np.asarray(v["foreground"]).reshape(-1, 2),
        )
        for index, v in sorted(collected.items())
    }


def read_prompt_markups(path: str | os.PathLike, geometry: Geometry, axis: int) -> dict[int, PromptSet]:
    """Read a `.mrk.json` file into {slice index along `axis`: PromptSet in (x, y) pixels}.

    Each point goes to its nearest voxel slice along `axis`. Raises FileNotFoundError for a missing file and
    ValueError for malformed JSON, a file that is not a point-list markups file, or a point outside the volume.
    """
    return markups_dict_to_prompts(load_markups_document(path), geometry, axis, name=Path(path).name)


def load_markups_document(path: str | os.PathLike) -> dict:
    """The parsed JSON of a `.mrk.json` file. FileNotFoundError for a missing file, ValueError naming
    the file for anything that is not a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"markups file not found: {p}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p.name}: not valid JSON ({exc})") from None
    except RecursionError:
        # json's decoder recurses once per nesting level; a markups file is a few levels deep.
        raise ValueError(f"{p.name}: not a Slicer markups file (JSON nested too deeply to read)") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{p.name}: not a Slicer markups file: no 'markups' list at the top level")
    return doc


def propagation_record(doc: dict, name: str = "the prompts file") -> dict | None:
    """The propagation record a prompts document carries (`propagation.document`), None without one.
    ValueError naming the file for a record this version cannot replay."""
    from FoBSegmentLib.propagation.document import RECORD_KEY, check_record

    if RECORD_KEY not in doc:
        return None
    try:
        return check_record(doc[RECORD_KEY])
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
