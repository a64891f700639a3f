"""The batch manifest: one CSV row per `fob segment` job, checked completely before anything runs.

Columns (header names, any order; empty cells mean "not given"):
    image          required: the volume (or 2D image) to segment
    support_mask   required: label map of the support (annotated slice(s), or another patient's labels)
    support_image  another patient's image (cross-patient support); default: the row's image itself
    support_label  label value of the organ in support_mask (needed when it holds several)
    reference      a reference label map of the image: the row's Dice is computed against it
    reference_label  label value of the organ in the reference (default support_label, else any non-zero)
    name           the row's name in OUTDIR (default: the image's file name without its suffix)
    output         the label map to write (default OUTDIR/<name>.nii.gz; OUTDIR/<name>.png for a 2D picture)
    options, as `fob segment` takes them: slices, absent_slices (e.g. "12,40"), segmenter, refine,
    prompts_from, modality, window, axis, label_value, largest_component, model, sam_checkpoint, device

Relative paths are relative to the manifest's folder, so a manifest and its data can move together.
Every error names the row as `row N` (N = 1 for the first row under the header, = line N + 1).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED = ("image", "support_mask")
PATH_COLUMNS = ("image", "support_mask", "support_image", "reference", "model", "sam_checkpoint")
INT_COLUMNS = ("support_label", "reference_label", "label_value", "axis")
TEXT_COLUMNS = ("name", "output", "slices", "absent_slices", "segmenter", "refine", "prompts_from", "modality", "window",
                "device", "largest_component")
COLUMNS = (*REQUIRED, "support_image", "support_label", "reference", "reference_label", "name", "output",
           "slices", "absent_slices", "segmenter", "refine", "prompts_from", "modality", "window", "axis",
           "label_value", "largest_component", "model", "sam_checkpoint", "device")
# The one file name suffix each kind of output of a row gets in OUTDIR.
STATUS_SUFFIX = ".status.json"
MONTAGE_SUFFIX = ".montage.png"
_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n", ""}


class ManifestError(ValueError):
    """A manifest that cannot run; the message names the manifest and the row."""


@dataclass
class BatchRow:
    """One checked row: `request` holds exactly the `SegmentRequest` fields; paths are absolute."""

    number: int  # 1-based data row
    name: str
    request: dict[str, Any]
    reference: str | None = None
    reference_label: int | None = None
    raw: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.request["output"])

    def key(self) -> str:
        """A fingerprint of what the row computes: a status record with another key is stale.

        Input files enter by size and modification time (hashing hundreds of volumes would cost
        more than it saves), the options by value.
        """
        parts: dict[str, Any] = {"request": {k: str(v) for k, v in sorted(self.request.items())},
                                 "reference": self.reference, "reference_label": self.reference_label}
        for col in PATH_COLUMNS:
            p = self.request.get(col) if col != "reference" else self.reference
            if p:
                st = os.stat(p)
                parts[f"stat:{col}"] = [st.st_size, st.st_mtime_ns]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def status_path(self, outdir: Path) -> Path:
        return outdir / (self.name + STATUS_SUFFIX)

    def montage_path(self, outdir: Path) -> Path:
        return outdir / (self.name + MONTAGE_SUFFIX)


def _stem(path: str) -> str:
    name = Path(path.rstrip("/\\")).name
    for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _int_value(text: str, col: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{col}: expected an integer, got {text!r}") from None


def _row_request(raw: dict[str, str], base: Path, outdir: Path) -> tuple[str, dict[str, Any], str | None, int | None]:
    """(name, SegmentRequest fields, reference, reference label) of one row; ValueError with the column."""
    from FoBSegmentLib.device import check_device
    from FoBSegmentLib.io.intensity import parse_window
    from FoBSegmentLib.propagation import PROMPT_SOURCES, parse_slice_list, parse_slices
    from FoBSegmentLib.propagation.refine import parse_refine

    values = {k: (v or "").strip() for k, v in raw.items()}
    for col in REQUIRED:
        if not values.get(col):
            raise ValueError(f"{col} is empty")
    paths: dict[str, str | None] = {}
    for col in PATH_COLUMNS:
        text = values.get(col, "")
        if not text:
            paths[col] = None
            continue
        p = Path(text).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise FileNotFoundError(f"{col} {text} not found")
        paths[col] = str(p.resolve())
    ints = {col: _int_value(values[col], col) if values.get(col) else None for col in INT_COLUMNS}
    name = values.get("name") or _stem(values["image"])
    if "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"name {name!r} must be a plain file name (no folder, not hidden)")
    output = values.get("output")
    if output:
        out = Path(output).expanduser()
        out = out if out.is_absolute() else base / out
    else:
        from FoBSegmentLib.io.volumes import IMAGE_2D_SUFFIXES

        # A 2D picture's mask is a picture too (as `fob segment` writes it for a .png output).
        two_d = Path(values["image"]).suffix.lower() in IMAGE_2D_SUFFIXES
        out = outdir / f"{name}{'.png' if two_d else '.nii.gz'}"
    if out.parent.resolve() != outdir and not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    req: dict[str, Any] = {
        "image": paths["image"], "output": str(out.resolve()), "support_mask": paths["support_mask"],
        "support_image": paths["support_image"], "support_label": ints["support_label"],
        "label_value": ints["label_value"], "model": paths["model"], "sam_checkpoint": paths["sam_checkpoint"],
    }
    if values.get("slices"):
        req["slices"] = parse_slices(values["slices"])
    if values.get("absent_slices"):
        req["absent_slices"] = parse_slice_list(values["absent_slices"])
    if values.get("segmenter"):
        req["segmenter"] = values["segmenter"]
    if parse_refine(values.get("refine")):
        req["refine"] = values["refine"]
    if values.get("prompts_from"):
        if values["prompts_from"] not in ("auto", *PROMPT_SOURCES):
            raise ValueError(f"prompts_from: choose from auto, {', '.join(PROMPT_SOURCES)}, got {values['prompts_from']!r}")
        req["prompts_from"] = values["prompts_from"]
    if values.get("modality"):
        if values["modality"] not in ("auto", "ct", "mr", "rgb"):
            raise ValueError(f"modality: choose from auto, ct, mr, rgb, got {values['modality']!r}")
        req["modality"] = values["modality"]
    if values.get("window"):
        req["window"] = parse_window(values["window"])
    if values.get("device"):
        req["device"] = check_device(values["device"])
    if ints["axis"] is not None:
        if ints["axis"] not in (0, 1, 2):
            raise ValueError(f"axis: must be 0, 1 or 2, got {ints['axis']}")
        req["axis"] = ints["axis"]
    flag = values.get("largest_component", "").lower()
    if flag not in _TRUE | _FALSE:
        raise ValueError(f"largest_component: expected true or false, got {values['largest_component']!r}")
    req["largest_component"] = flag in _TRUE
    req = {k: v for k, v in req.items() if v is not None}
    return name, req, paths["reference"], ints["reference_label"]


def read_manifest(path: str | os.PathLike, outdir: str | os.PathLike) -> list[BatchRow]:
    """Read and check the whole manifest; ManifestError (one line, with the row) on the first problem.

    Checked before any job runs: the header (required columns present, no unknown or repeated
    column), every row's files exist and its options parse, no two rows write the same output (or
    status record), and no row's output is any row's input.
    """
    from FoBSegmentLib.io.volumes import LABEL_OUTPUT_SUFFIXES

    mpath = Path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"manifest {mpath} not found")
    base = mpath.resolve().parent
    outdir = Path(outdir).resolve()
    try:
        text = mpath.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {mpath.name} is not a UTF-8 text (CSV) file") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ManifestError(f"manifest {mpath.name} is empty; it needs a header line with {', '.join(REQUIRED)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"manifest {mpath.name}: missing column(s) {', '.join(missing)} in the header")
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        raise ManifestError(f"manifest {mpath.name}: unknown column(s) {', '.join(unknown)}; "
                            f"known: {', '.join(COLUMNS)}")
    if len(set(header)) != len(header):
        raise ManifestError(f"manifest {mpath.name}: a column appears twice in the header")
    reader.fieldnames = header
    rows: list[BatchRow] = []
    for number, raw in enumerate(reader, start=1):
        if None in raw:
            raise ManifestError(f"manifest {mpath.name} row {number}: more cells than header columns")
        if not any((v or "").strip() for v in raw.values()):
            continue  # a blank line
        try:
            name, req, ref, ref_label = _row_request(raw, base, outdir)
        except (ValueError, FileNotFoundError) as exc:
            raise ManifestError(f"manifest {mpath.name} row {number}: {' '.join(str(exc).split())}") from None
        out = Path(req["output"])
        if not any(out.name.lower().endswith(s) for s in LABEL_OUTPUT_SUFFIXES):
            raise ManifestError(f"manifest {mpath.name} row {number}: output {out.name} has an unsupported "
                                f"extension; use one of {', '.join(LABEL_OUTPUT_SUFFIXES)}")
        rows.append(BatchRow(number, name, req, ref, ref_label, {k: v or "" for k, v in raw.items()}))
    if not rows:
        raise ManifestError(f"manifest {mpath.name} has no row")
    _check_collisions(rows, mpath.name, outdir)
    return rows


def _check_collisions(rows: list[BatchRow], manifest: str, outdir: Path) -> None:
    written: dict[Path, int] = {}
    names: dict[str, int] = {}
    for row in rows:
        if row.output in (outdir / "report.html", outdir / "dice.png"):
            raise ManifestError(f"manifest {manifest} row {row.number}: output {row.output.name} is the cohort's "
                                "report; give the row another name or output")
        for p in (row.output, row.status_path(outdir), row.montage_path(outdir)):
            if p in written and written[p] != row.number:
                raise ManifestError(f"manifest {manifest} row {row.number}: writes {p.name} like row {written[p]} "
                                    "(duplicate output; give each row its own name or output)")
            written[p] = row.number
        if row.name in names:
            raise ManifestError(f"manifest {manifest} row {row.number}: name {row.name} is also row "
                                f"{names[row.name]}'s (duplicate output; add a name column)")
        names[row.name] = row.number
    for row in rows:
        inputs = [row.request.get(c) for c in ("image", "support_mask", "support_image", "model", "sam_checkpoint")]
        for inp in [*inputs, row.reference]:
            if inp is None:
                continue
            q = Path(inp)
            hit = written.get(q)
            if hit is None and q.is_dir():
                hit = next((n for p, n in written.items() if q in p.parents), None)
            if hit is not None:
                raise ManifestError(f"manifest {manifest} row {hit}: its output {q.name} would overwrite "
                                    f"an input of row {row.number}")
