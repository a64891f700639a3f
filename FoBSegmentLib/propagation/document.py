"""A propagation as a document: the record a prompts file carries so that the prompts give back the
mask, and the replay that rebuilds the result from it.

The record (JSON, stored beside the point lists in the `.mrk.json`, key `RECORD_KEY`) holds, per
segmented slice in the order the slices were accepted: how it was obtained (source, the slice its
prompts and shape prior came from, flags), a fingerprint of the prompts it received, and what is
not a point (FoB's coarse probability, a prior that is no accepted slice). It also holds the job's
configuration, slice range, annotated slices and a fingerprint of the support. What the segmenter
learnt (graphcut's appearance model) is re-learnt from the support, deterministically, and for a
slice whose entry names another `look` (`neighbour.gap_step`) from the support and its parent's
accepted mask.

Replay (`replay`) of an unedited file reproduces the mask voxel for voxel. When a person changed
the points of a slice, that slice is segmented with their points and the slice's recorded shape
prior, and only the slices whose result depends on it are propagated again: the slices chained
from it (its descendants along the chain, up to where the chain would stop). A slice whose points
were all removed is cleared together with its descendants. Points on a slice the record does not
know are segmented with the accepted neighbour towards the annotation as prior and chained onward
from there; without an accepted neighbour, from the points alone.

Frames: slice indices along the record's `axis` of the [k, j, i] array; prompts (x, y) = (column,
row) pixels; masks (H, W) bool.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation.config import PropagationConfig
from FoBSegmentLib.propagation.fob import REFUSED, dequantize_probability, fob_look, quantize_probability
from FoBSegmentLib.propagation.motion import move_mask
from FoBSegmentLib.propagation.neighbour import (
    chain,
    chain_stop,
    cross_patient_look,
    fill_areas,
    gap_step,
    learn_appearance,
    query_seed_look,
    seed_piece,
)
from FoBSegmentLib.propagation.runner import Runner
from FoBSegmentLib.propagation.types import PropagationResult, SliceReport, SupportSlice

RECORD_KEY = "fobPropagation"
RECORD_VERSION = 1


def prompt_fingerprint(ps: PromptSet) -> str:
    """A short hash of a slice's points (order and exact float64 values)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ps.background, "<f8").tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(ps.foreground, "<f8").tobytes())
    return h.hexdigest()[:20]


def support_fingerprint(supports: list[SupportSlice]) -> str:
    h = hashlib.sha256()
    for s in sorted(supports, key=lambda s: s.index):
        h.update(str(s.index).encode())
        h.update(np.packbits(np.asarray(s.mask, bool)).tobytes())
        h.update(np.ascontiguousarray(s.image, "<f4").tobytes())
    return h.hexdigest()[:20]


def _pack(array: np.ndarray) -> dict[str, Any]:
    a = np.asarray(array)
    raw = np.packbits(a).tobytes() if a.dtype == bool else a.astype(np.uint8).tobytes()
    return {"shape": list(a.shape), "dtype": "bool" if a.dtype == bool else "uint8",
            "data": base64.b64encode(zlib.compress(raw, 9)).decode("ascii")}


def _unpack(doc: dict[str, Any]) -> np.ndarray:
    try:
        shape = tuple(int(v) for v in doc["shape"])
        raw = zlib.decompress(base64.b64decode(doc["data"]))
        if doc["dtype"] == "bool":
            return np.unpackbits(np.frombuffer(raw, np.uint8))[: int(np.prod(shape))].reshape(shape).astype(bool)
        return np.frombuffer(raw, np.uint8).reshape(shape).copy()
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ValueError(f"propagation record: a stored array is damaged ({exc})") from None


def build_record(
    result: PropagationResult,
    config: PropagationConfig,
    supports: list[SupportSlice],
    same_volume: bool,
    chain_range: tuple[int, int],
    shape: tuple[int, ...],
) -> dict[str, Any]:
    """The record of a finished propagation (see the module docstring)."""
    entries = []
    for z in result.order:
        rep, ps = result.slices[z], result.prompts.get(z)
        if ps is None:
            continue
        entry: dict[str, Any] = {
            "index": int(z),
            "source": rep.source if rep.source != "skipped" else "neighbour",
            "kept": rep.source != "skipped",
            "parent": rep.parent,
            "prior": rep.prior,
            "prompts": prompt_fingerprint(ps),
            "support": rep.support_index,
            "flags": list(rep.flags),
        }
        if rep.source == "skipped":
            # A stepping stone outside an explicit range: not in the prompts file, but the slices
            # chained from it need its mask, so its points travel in the record.
            entry["points"] = {"background": ps.background.tolist(), "foreground": ps.foreground.tolist()}
        if rep.prior in ("stored", "self") and ps.prior_mask is not None:
            entry["priorMask"] = _pack(ps.prior_mask)
        if rep.look != "annotations":
            entry["look"] = rep.look
            if rep.ahead is not None:
                entry["ahead"] = int(rep.ahead)
            if rep.cone:
                entry["cone"] = True
        if ps.fg_probability is not None:
            entry["fgProbability"] = _pack(quantize_probability(ps.fg_probability))
        entries.append(entry)
    return {
        "version": RECORD_VERSION,
        "axis": int(result.axis),
        "shape": [int(v) for v in shape],
        "promptsFrom": result.prompts_from,
        "config": config.to_json(),
        "range": [int(chain_range[0]), int(chain_range[1])],
        "sameVolume": bool(same_volume),
        "annotated": sorted(int(s.index) for s in supports) if same_volume else [],
        "support": support_fingerprint(supports),
        "slices": entries,
    }


def check_record(record: object) -> dict[str, Any]:
    """The record if it is one this version can replay; ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("propagation record: not an object")
    if record.get("version") != RECORD_VERSION:
        raise ValueError(f"propagation record: version {record.get('version')!r} is not {RECORD_VERSION}")
    for key in ("axis", "shape", "promptsFrom", "config", "range", "slices", "annotated"):
        if key not in record:
            raise ValueError(f"propagation record: '{key}' is missing")
    if not isinstance(record["slices"], list) or not all(isinstance(e, dict) and "index" in e for e in record["slices"]):
        raise ValueError("propagation record: 'slices' must be a list of slice entries")
    return record


def _root(entries: dict[int, dict[str, Any]], z: int) -> int:
    """The slice a chain through z started from (follow parents while they are recorded)."""
    seen = set()
    while entries.get(z, {}).get("parent") is not None and z not in seen:
        seen.add(z)
        z = int(entries[z]["parent"])
    return z


def _descendants(entries: dict[int, dict[str, Any]], z: int) -> set[int]:
    out: set[int] = set()
    frontier = {z}
    while frontier:
        nxt = {k for k, e in entries.items() if e.get("parent") in frontier and k not in out}
        out |= nxt
        frontier = nxt
    return out


class _Replay:
    def __init__(self, run: Runner, record: dict[str, Any], supports: list[SupportSlice], same_volume: bool,
                 previous: PropagationResult | None = None) -> None:
        self.run = run
        # The result this record describes: its unedited slices are taken over, not segmented again.
        self.previous = previous if previous is not None and previous.record is record else None
        self.record = record
        self.entries = {int(e["index"]): e for e in record["slices"]}
        self.annotated = {s.index for s in supports} if same_volume else set()
        # Body seeds (`neighbour.body_seed_pass`): seeds of the chains like the annotated slices, their
        # masks in the record, their look learnt with the annotations'.
        body = [SupportSlice(z, run.slice(z), _unpack(e["priorMask"]), run.n) for z, e in sorted(self.entries.items())
                if same_volume and e.get("look") == "body" and "priorMask" in e]
        run.body_seeds = {s.index for s in body}
        supports = sorted([*supports, *body], key=lambda s: s.index)
        self.support_of = {s.index: s for s in supports}
        self.seed_slices = (sorted(self.annotated | run.body_seeds)
                            or sorted(z for z, e in self.entries.items() if e.get("parent") is None))
        self.rng = (int(record["range"][0]), int(record["range"][1]))
        self.seed_areas = fill_areas(run, {z: self.support_of[z].mask for z in self.seed_slices
                                           if z in self.support_of})
        self.look = None
        # Another patient's located seed: kept to the piece the live run kept (`neighbour.seed_piece`).
        self.seed_piece: tuple[np.ndarray, np.ndarray, list[SupportSlice]] | None = None
        if record["promptsFrom"] in ("neighbour", "hybrid", "chained"):
            if not same_volume and run.config.cross_chunk_agreement is not None and len(supports) > 1:
                # A whole labelled organ: the pass that stands ran from one support alone, the one its
                # slices name (`neighbour.chunk_consensus`).
                named = {e.get("support") for e in record["slices"]}
                supports = [s for s in supports if s.index in named][:1] or [supports[len(supports) // 2]]
            looks = supports
            seed = next((e for e in record["slices"] if e.get("prior") == "stored" and "priorMask" in e), None)
            own = next((e for e in record["slices"] if e.get("prior") == "self" and "priorMask" in e), None)
            if not same_volume and own is not None:
                # A cross-patient second pass: the look of the query's own seed slice.
                z1 = int(own["index"])
                looks = [SupportSlice(z1, run.slice(z1), _unpack(own["priorMask"]), run.n)]
            elif not same_volume and seed is not None and run.n > 1:
                # Another patient's support: the look the live run learnt from the located seed.
                z0, moved = int(seed["index"]), _unpack(seed["priorMask"])
                looks = (query_seed_look(run, z0, moved) if seed.get("look") == "query"
                         else cross_patient_look(run, supports, z0, moved)[0])
                self.seed_piece = (moved, supports[len(supports) // 2].mask, looks)
            self.look = learn_appearance(run, looks)
        elif record["promptsFrom"] == "fob":
            # Each FoB slice is cut from its own prompts and mask prompt, with the look the run learnt;
            # an edited one starts no chain.
            fob_look(run, supports, same_volume)
        self.done: set[int] = set()
        self.dirty: set[int] = set()

    def prompts_for(self, z: int, e: dict[str, Any], points: PromptSet, edited: bool) -> PromptSet:
        prior = None
        if e.get("prior") in ("parent", "moved") and e.get("parent") is not None:
            parent = int(e["parent"])
            prior = self.run.accepted(parent)
            if e["prior"] == "moved":
                prior = move_mask(prior, self.run.slice(parent), self.run.slice(z))
        elif e.get("prior") in ("stored", "self") and "priorMask" in e:
            prior = _unpack(e["priorMask"])
        prob = None
        if "fgProbability" in e and not edited:
            # A person's new points override what FoB thought the slice looked like.
            prob = dequantize_probability(_unpack(e["fgProbability"]))
        return PromptSet(points.background, points.foreground, fg_probability=prob, prior_mask=prior)

    def rechain(self, z: int, e: dict[str, Any], mask: np.ndarray) -> None:
        """Propagate again from slice z: its recorded descendants are replaced by a new chain. A slice
        filled from the interpolated shape of two annotations has none, and starts no chain."""
        if self.look is None or e.get("source") == "interpolated":
            return
        below = _descendants(self.entries, z)
        self.done |= below
        for d in below:
            if self.run.reports[d].source != "skipped":
                self.run.drop(d)
            self.run.prompts.pop(d, None)
        steps = [z - int(e["parent"])] if e.get("parent") is not None else [-1, 1]
        root = _root(self.entries, z)
        for step in steps:
            bounds = chain_stop(root, step, self.seed_slices, self.rng, self.seed_areas)
            if bounds is None:
                continue
            stop, nxt = bounds
            if (stop - z) * step > 0:
                chain(self.run, z, mask, step, stop, nxt, e.get("support") or 0, self.look)

    def slice(self, z: int, e: dict[str, Any], points: PromptSet | None) -> None:
        run = self.run
        parent = e.get("parent")
        edited = points is None or prompt_fingerprint(points) != e.get("prompts")
        if points is None or (len(points.background) == 0 and len(points.foreground) == 0):
            # The person removed every point: the slice and what was chained from it go.
            run.reports[z].flags.append("cleared: its prompts were removed")
            for d in {z} | _descendants(self.entries, z):
                self.done.add(d)
                if run.reports[d].source != "skipped":
                    run.drop(d)
                run.prompts.pop(d, None)
            return
        if parent is not None and int(parent) not in self.annotated and run.reports[int(parent)].source == "skipped":
            self.done.add(z)  # its parent was cleared
            return
        ps = self.prompts_for(z, e, points, edited)
        run.check_cancel()
        if not edited and self.previous is not None and self.previous.accepted is not None:
            m = np.asarray(take_slice(self.previous.accepted, run.axis, z), bool)
            score = self.previous.slices[z].score
        elif not edited and e.get("prior") == "self" and ps.prior_mask is not None:
            m, score = ps.prior_mask, None  # a second pass's seed: its mask is in the record
        else:
            look = e.get("look", "annotations") if parent is not None else "annotations"
            with gap_step(run, look, z, parent, run.accepted(int(parent)) if parent is not None else None,
                          e.get("ahead"), cone=bool(e.get("cone", False))):
                try:
                    m, score = run.segment(z, ps)
                except ValueError:
                    # The run left this slice empty for the same refusal; edited points get the error.
                    if edited or not any(f.startswith(REFUSED) for f in e.get("flags", [])):
                        raise
                    m, score = np.zeros(run.hw, bool), 0.0
            if not edited and parent is None and e.get("prior") == "stored" and self.seed_piece is not None:
                m = seed_piece(run, z, m, *self.seed_piece)
        source = "edited" if edited else e.get("source", "neighbour")
        rep = SliceReport(z, source, support_index=e.get("support"), parent=parent, prior=e.get("prior", "none"),
                          score=score, flags=[] if edited else list(e.get("flags", [])),
                          look=e.get("look", "annotations"), ahead=e.get("ahead"), cone=bool(e.get("cone", False)))
        run.accept(z, m, rep, ps)
        run.tick(f"slice {z}")
        self.done.add(z)
        if edited:
            self.dirty.add(z)
            self.rechain(z, e, m)

    def new_slice(self, z: int, points: PromptSet) -> None:
        """Points on a slice the record does not know: prior and chain from an accepted neighbour."""
        run = self.run
        parent = None
        for cand in (z - 1, z + 1):
            if 0 <= cand < run.n and run.reports[cand].source not in ("skipped",) and run.accepted(cand).any():
                if parent is None or self._closer_to_annotation(cand, parent):
                    parent = cand
        e = {"index": z, "parent": parent, "prior": "parent" if parent is not None and run.config.shape_prior else "none",
             "support": None}
        ps = self.prompts_for(z, e, points, edited=True)
        m, score = run.segment(z, ps)
        run.accept(z, m, SliceReport(z, "edited" if parent is not None else "prompts-in", parent=parent,
                                     prior=e["prior"], score=score), ps)
        run.tick(f"slice {z}")
        if parent is not None and self.look is not None:
            step = z - parent
            bounds = chain_stop(_root(self.entries, parent), step, self.seed_slices, (0, run.n - 1), self.seed_areas)
            if bounds is not None:
                stop, nxt = bounds
                if (stop - z) * step > 0:
                    chain(run, z, m, step, stop, nxt, 0, self.look)

    def _closer_to_annotation(self, a: int, b: int) -> bool:
        if not self.annotated:
            return False
        da = min(abs(a - s) for s in self.annotated)
        db = min(abs(b - s) for s in self.annotated)
        return da < db


def replay(
    run: Runner,
    record: dict[str, Any],
    prompts_in: dict[int, PromptSet],
    supports: list[SupportSlice],
    same_volume: bool,
    previous: PropagationResult | None = None,
) -> tuple[str, tuple[int, int]]:
    """Rebuild a propagation from its record and the (possibly edited) prompts of the file; the
    runner's config must be the record's. previous: the result the record belongs to (its `record`
    is this record): unedited slices whose parent is unchanged are taken from it. Returns (prompt
    source, slice range) for the new record."""
    rep = _Replay(run, check_record(record), supports, same_volume, previous)
    pending = dict(prompts_in)
    n_edited = 0
    for e in record["slices"]:
        z = int(e["index"])
        points = pending.pop(z, None)
        if not e.get("kept", True) and "points" in e:
            points = PromptSet(e["points"]["background"], e["points"]["foreground"])
        if z in rep.done or z in rep.annotated:
            continue
        if not 0 <= z < run.n:
            raise ValueError(f"propagation record: slice {z} is outside 0..{run.n - 1}")
        before = len(rep.dirty)
        rep.slice(z, e, points)
        n_edited += len(rep.dirty) - before
    new = sorted(z for z in pending if z not in rep.annotated and z not in rep.done)
    for z in new:
        if not 0 <= z < run.n:
            raise ValueError(f"the prompts file has points on slice {z}, outside 0..{run.n - 1}")
        rep.new_slice(z, pending[z])
    for z, e in rep.entries.items():
        if not e.get("kept", True) and run.reports[z].source != "skipped":
            run.drop(z, "outside the requested slice range")
            run.prompts.pop(z, None)
    if n_edited or new:
        run.notes.append(
            f"replayed the propagation record: {n_edited} edited slice(s), {len(new)} new slice(s); "
            "the slices chained from them were propagated again"
        )
    else:
        run.notes.append("replayed the propagation record: no slice was edited")
    return str(record["promptsFrom"]), rep.rng


def edited_slices(record: dict[str, Any], prompts: dict[int, PromptSet]) -> list[int]:
    """The slices whose points differ from those the record's run gave them: moved, added or removed
    points, or points on a slice the run did not segment. Annotated slices and stepping stones (whose
    points live in the record, `build_record`) are not counted."""
    annotated = {int(z) for z in record["annotated"]}
    given = {int(e["index"]): e["prompts"] for e in record["slices"] if e.get("kept", True)}
    changed = {z for z, fp in given.items() if z not in annotated
               and (z not in prompts or prompt_fingerprint(prompts[z]) != fp)}
    changed |= {z for z in prompts if z not in given and z not in annotated}
    return sorted(changed)


def config_from_record(record: dict[str, Any]) -> PropagationConfig:
    return PropagationConfig.from_json(check_record(record)["config"])


__all__ = ["RECORD_KEY", "build_record", "check_record", "config_from_record", "edited_slices", "prompt_fingerprint",
           "replay"]
