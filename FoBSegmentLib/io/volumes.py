"""Reading images and label maps with their geometry, and writing label maps atomically.

Supported inputs: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), a folder
holding a DICOM series, and 2D images (.png, .jpg, .jpeg, .bmp, .tif, .tiff).

Frames: 3D arrays are indexed [k, j, i] (SimpleITK's `GetArrayFromImage`); `Geometry` (from
`io/coords.py`) holds spacing/origin/direction in LPS. A 2D image is a one-slice volume: its
geometry has size (W, H, 1), spacing 1 mm, origin 0, identity direction, and its slices are taken
along array axis 0. 2D RGB images keep their colour: `Volume.array` is then (H, W, 3).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from FoBSegmentLib.atomic import atomic_output, check_writable
from FoBSegmentLib.io.coords import Geometry

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Formats a label map can be written to (SimpleITK picks the writer from the suffix). Single-file
# formats only: a detached header (.mhd, .nhdr) names its data file, which an atomic rename breaks.
LABEL_OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".png")


@dataclass
class Volume:
    """An image (or label map) and the grid it lives on.

    array: 3D / 2D grey: [k, j, i] (a 2D image is [1, H, W]); 2D RGB: (H, W, 3).
        Images are float32; label maps keep an integer dtype.
    geometry: the voxel grid (LPS), size (i, j, k); for 2D images (W, H, 1).
    path: where it was read from.
    modality_hint: "ct" / "mr" from a DICOM header, "rgb" for colour 2D images, else None.
    is_2d: a single 2D image (slices along axis 0, one slice).
    description: a short human-readable note on how it was read (DICOM series chosen, ...).
    """

    array: np.ndarray
    geometry: Geometry
    path: Path
    modality_hint: str | None = None
    is_2d: bool = False
    description: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 3 and self.is_2d and self.array.shape[-1] == 3

    @property
    def grid_array(self) -> np.ndarray:
        """The data as [k, j, i] (grey / labels) or [k, j, i, 3] (RGB), whatever the storage."""
        return self.array[None] if self.is_rgb else self.array


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suf in LABEL_OUTPUT_SUFFIXES + VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES:
        if name.endswith(suf):
            return suf
    return path.suffix.lower()


def _geometry_2d(height: int, width: int) -> Geometry:
    return Geometry(
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        size=(int(width), int(height), 1),
    )


def list_2d_images(folder: str | os.PathLike) -> list[Path]:
    """The pictures of a folder (.jpg/.jpeg/.png/.bmp), sorted by name, without the `<id>_mask.png`
    masks that sit beside them in the data folders (the images of `fob segment FOLDER`, issue 21)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    return [p for p in sorted(folder.iterdir())
            if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp") and not p.stem.endswith("_mask")]


def _read_2d(path: Path, as_label: bool) -> Volume:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            # An alpha channel is ignored (documented, issue 21): the colour channels are segmented.
            alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
                arr = np.asarray(img.convert("RGB"))
            else:
                arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read {path}: not a readable image ({exc})") from None
    if arr.ndim == 3:
        grey = np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
        if as_label and not grey:
            raise ValueError(f"{path} is a colour image; a label map must be a single-channel image")
        if as_label:
            arr = arr[..., 0]
        else:
            # A grey picture saved as RGB is still an RGB photograph to the user (dermoscopy); keep colour.
            geo = _geometry_2d(arr.shape[0], arr.shape[1])
            desc = f"2D RGB image {arr.shape[1]}x{arr.shape[0]}" + (", alpha channel ignored" if alpha else "")
            return Volume(arr.astype(np.float32), geo, path, "rgb", True, desc)
    if arr.ndim != 2:
        raise ValueError(f"cannot read {path}: unexpected image shape {arr.shape}")
    geo = _geometry_2d(arr.shape[0], arr.shape[1])
    data = arr[None].astype(np.int32 if as_label else np.float32)
    return Volume(data, geo, path, None, True, f"2D grey image {arr.shape[1]}x{arr.shape[0]}")


def _read_dicom_folder(path: Path) -> tuple[object, str | None, str]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    with _itk_warnings_silenced():
        series_ids = list(reader.GetGDCMSeriesIDs(str(path)) or [])
        if not series_ids:
            raise ValueError(f"{path} is a folder without a readable DICOM series")
        files_per_series = {sid: reader.GetGDCMSeriesFileNames(str(path), sid) for sid in series_ids}
    # The longest series is the volume a user means when a folder holds localisers or scouts too.
    sid = max(series_ids, key=lambda s: len(files_per_series[s]))
    files = files_per_series[sid]
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"cannot read the DICOM series in {path}: {_first_line(exc)}") from None
    modality = None
    if reader.HasMetaDataKey(0, "0008|0060"):
        tag = reader.GetMetaData(0, "0008|0060").strip().upper()
        modality = {"CT": "ct", "MR": "mr"}.get(tag)
    desc = f"DICOM series of {len(files)} files"
    if len(series_ids) > 1:
        desc += f" (the longest of {len(series_ids)} series in the folder)"
    return image, modality, desc


# Pieces of SimpleITK / ITK exception text that mean nothing to a user: the wrapper's function
# name, C++ source locations (a build machine's paths), "sitk::ERROR:" tags and object addresses.
_ITK_NOISE = (
    re.compile(r"Exception thrown in SimpleITK \w+:\s*"),
    re.compile(r"(?:In )?\S+\.(?:cxx|cpp|hxx|txx|h)(?::\d+|, line \d+)?:?\s*"),
    re.compile(r"\b(?:sitk|itk)::(?:ERROR|WARNING|ExceptionObject)\b:?\s*"),
    re.compile(r"\b\w+ \(0x[0-9a-fA-F]+\):?\s*"),
)


def _first_line(exc: BaseException) -> str:
    """ITK's reason for a failure as one short line, without source paths or internal tags."""
    text = " ".join(str(exc).split())
    for pattern in _ITK_NOISE:
        text = pattern.sub("", text)
    if text.startswith("Unable to determine ImageIO reader"):
        return "no image reader recognises its contents"
    return text[:300].strip() or type(exc).__name__


@contextmanager
def _itk_warnings_silenced() -> Iterator[None]:
    """ITK prints multi-line WARNING blocks on stderr (e.g. for a folder without DICOM files); the
    caller reports the outcome itself in one line, so they are turned off meanwhile."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def _sitk_to_volume(image, path: Path, as_label: bool, modality: str | None, desc: str) -> Volume:
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim == 4:
        raise ValueError(
            f"{path} is a 4D image (size {tuple(image.GetSize())}); fob segments 3D volumes: "
            "extract one time point first"
        )
    if dim == 3 and image.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector or 4D image); "
            "fob segments 3D scalar volumes: extract one channel first"
        )
    if dim > 4:
        raise ValueError(f"{path} has {dim} dimensions; fob segments 3D volumes")
    if dim == 2:
        if image.GetNumberOfComponentsPerPixel() not in (1,):
            raise ValueError(f"{path} is a 2D multi-channel image that is not a .png/.jpg; convert it to PNG")
        image = sitk.JoinSeries(image)
    arr = sitk.GetArrayFromImage(image)
    geo = Geometry.from_sitk(image)
    if as_label:
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
                raise ValueError(f"{path} holds non-integer values; a label map must hold integer labels")
        arr = np.round(arr).astype(np.int32) if arr.dtype != np.uint8 else arr
    else:
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{path} contains NaN or infinite voxel values; fob needs finite intensities")
    return Volume(arr, geo, path, modality, dim == 2, desc)


# NIfTI datatype codes of the float types a NaN or infinity can hide in (NIFTI_TYPE_FLOAT32/64).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}
_CHUNK = 1 << 22


def _nifti_layout(header: bytes) -> tuple[str, int, int, str | None] | None:
    """(byte order, vox_offset, bitpix, float dtype or None) of a NIfTI-1 or NIfTI-2 header; None if
    `header` is neither."""
    for order in "<>":
        if len(header) >= 348 and int(np.frombuffer(header[:4], f"{order}i4")[0]) == 348:
            datatype, bitpix = (int(v) for v in np.frombuffer(header[70:74], f"{order}i2"))
            vox_offset = int(np.frombuffer(header[108:112], f"{order}f4")[0])
        elif len(header) >= 540 and int(np.frombuffer(header[:4], f"{order}i4")[0]) == 540:
            datatype, bitpix = (int(v) for v in np.frombuffer(header[12:16], f"{order}i2"))
            vox_offset = int(np.frombuffer(header[168:176], f"{order}i8")[0])
        else:
            continue
        dtype = _NIFTI_FLOATS.get(datatype)
        return order, vox_offset, bitpix, (order + dtype) if dtype else None
    return None


def _check_complete(path: Path, image) -> bool:
    """ValueError for a truncated file; True when a float NIfTI holds NaN or infinite voxels.

    ITK's NIfTI reader zero-fills a cut-off .nii.gz silently and reads NaN / inf voxels as 0, so
    neither shows in the array SimpleITK returns: both are checked on the file's own bytes, in one
    streaming pass (integer NIfTI files cost only their header, or the gzip check they had anyway).
    """
    import gzip
    import zlib

    name = path.name.lower()
    gz = name.endswith(".gz")
    if not gz and not name.endswith(".nii"):
        return False
    nvox = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)
            layout = _nifti_layout(head) if name.endswith((".nii", ".nii.gz")) else None
            if layout is None or layout[3] is None:
                if gz:
                    while fh.read(_CHUNK):
                        pass
                elif layout is not None and path.stat().st_size < layout[1] + nvox * layout[2] // 8:
                    raise ValueError(f"cannot read {path}: the file is truncated ({path.stat().st_size} bytes)")
                return False
            _, vox_offset, _, dtype = layout
            item = np.dtype(dtype).itemsize
            pending = head[vox_offset:]
            if vox_offset > len(head):
                fh.read(vox_offset - len(head))
            remaining = nvox * item
            nonfinite = False
            while remaining > 0:
                if len(pending) < item:
                    more = fh.read(min(_CHUNK, remaining))
                    if not more:
                        raise ValueError(f"cannot read {path}: the file is truncated (voxel data ends early)")
                    pending += more
                usable = min(len(pending) - len(pending) % item, remaining)
                values = np.frombuffer(pending[:usable], dtype)
                nonfinite = nonfinite or not bool(np.isfinite(values).all())
                pending, remaining = pending[usable:], remaining - usable
            if gz:
                while fh.read(_CHUNK):  # the rest of the stream: a corrupt tail is still an error
                    pass
            return nonfinite
    except (EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read {path}: the compressed file is truncated or corrupt ({exc})") from None
    except OSError as exc:
        if gz:
            raise ValueError(f"cannot read {path}: the compressed file is truncated or corrupt ({exc})") from None
        raise


def _read(path: str | os.PathLike, as_label: bool) -> Volume:
    import SimpleITK as sitk

    p = Path(path)
    what = "label map" if as_label else "image"
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        image, modality, desc = _read_dicom_folder(p)
        return _sitk_to_volume(image, p, as_label, modality, desc)
    if p.stat().st_size == 0:
        raise ValueError(f"cannot read {p}: the file is empty (0 bytes)")
    suffix = _suffix(p)
    if suffix in IMAGE_2D_SUFFIXES and suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        return _read_2d(p, as_label)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {p}: not a readable {what} ({_first_line(exc)})") from None
    if _check_complete(p, image):
        what_kind = "a label map must hold integer labels" if as_label else "fob needs finite intensities"
        raise ValueError(f"{p} contains NaN or infinite voxel values; {what_kind}")
    if suffix in (".tif", ".tiff") and image.GetDimension() == 2 and image.GetNumberOfComponentsPerPixel() == 3:
        arr = sitk.GetArrayFromImage(image)
        return Volume(arr.astype(np.float32), _geometry_2d(*arr.shape[:2]), p, "rgb", True, "2D RGB image")
    if p.is_file() and p.stat().st_size and suffix not in VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES:
        desc = f"read by SimpleITK ({image.GetDimension()}D)"
    else:
        desc = f"{image.GetDimension()}D {suffix} image"
    return _sitk_to_volume(image, p, as_label, None, desc)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read an image: a 3D file, a DICOM series folder or a 2D PNG/JPG (RGB kept as (H, W, 3)).

    Raises FileNotFoundError when the path does not exist and ValueError for unreadable/corrupt
    files, 4D or multi-component volumes and NaN voxels. Intensities become float32, unscaled.
    """
    return _read(path, as_label=False)


def read_label(path: str | os.PathLike, reference: Volume | None = None) -> Volume:
    """Read a label map as [k, j, i] integers (a 2D mask as [1, H, W]).

    reference: when given, the label's grid must equal the reference image's grid (ValueError
    naming both otherwise); the label then carries the reference's geometry exactly.
    """
    label = _read(path, as_label=True)
    if label.array.ndim != 3:
        raise ValueError(f"{path}: a label map must be single-channel, got array shape {label.array.shape}")
    if reference is not None:
        check_same_grid(reference, label, "label map")
        label.geometry = reference.geometry
    return label


def check_same_grid(image: Volume, label: Volume, what: str = "mask") -> None:
    """Raise ValueError when `label` does not lie on `image`'s voxel grid (size, spacing, origin, direction)."""
    a, b = image.geometry, label.geometry
    if tuple(a.size) != tuple(b.size):
        raise ValueError(
            f"{what} {label.path.name} has size {tuple(b.size)} but image {image.path.name} has size {tuple(a.size)}"
        )
    if not a.same_grid(b, tol=1e-3):
        raise ValueError(
            f"{what} {label.path.name} does not share the geometry of image {image.path.name} "
            f"(spacing {_fmt(b.spacing)} vs {_fmt(a.spacing)}, origin {_fmt(b.origin)} vs {_fmt(a.origin)}, "
            f"direction {_fmt(b.direction)} vs {_fmt(a.direction)}); resample it onto the image grid first"
        )


def on_grid_of(image: Volume, label: Volume, what: str = "mask") -> tuple[Volume, str | None]:
    """`label` on `image`'s voxel grid, and a line saying when it had to be turned: as it is when it
    shares the grid; with its axes permuted and reversed (`coords.reorient`, nothing resampled) when
    it holds the same voxels at the same points stored in another orientation (a DICOM series' label
    map with the NIfTI of that series, a tool that saves in its own axis order). Otherwise the
    ValueError of `check_same_grid`."""
    from FoBSegmentLib.io.coords import orientation, reorient

    a, b = image.geometry, label.geometry
    if not image.is_2d and not label.is_2d and not a.same_grid(b, tol=1e-3):
        want, have = orientation(a), orientation(b)
        if want != have:
            array, turned = reorient(label.array, b, want)
            if a.same_grid(turned, tol=1e-3):
                return (replace(label, array=array, geometry=a),
                        f"{what} {label.path.name} is stored with its axes running {have}, its image's {want}: "
                        "turned onto the image's grid (the same voxels at the same points)")
    check_same_grid(image, label, what)
    return label, None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike | None] | tuple = ()) -> Path:
    """Validate an output label path before any work: known suffix, existing writable folder, not an
    input, not a read-only file.

    Returns the path. Raises ValueError / FileNotFoundError / NotADirectoryError / PermissionError
    with a one-line reason naming `out`.
    """
    p = Path(out)
    if p.exists() and p.is_dir():
        raise ValueError(f"output {p} is a folder; give a file name such as {p / 'segmentation.nii.gz'}")
    if _suffix(p) not in LABEL_OUTPUT_SUFFIXES:
        raise ValueError(
            f"output {p} has an unsupported extension; use one of {', '.join(LABEL_OUTPUT_SUFFIXES)}"
        )
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"output {p}: {parent} is not a folder")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder {parent} does not exist")
    target = p.resolve()
    for inp in inputs:
        if inp is None:
            continue
        q = Path(inp)
        same = target == q.resolve()
        if not same and p.exists() and q.exists():
            try:
                same = os.path.samefile(p, q)
            except OSError:
                same = False
        if same:
            raise ValueError(f"output {p} is also an input; refusing to overwrite an input")
        if q.is_dir() and q.resolve() in target.parents:
            raise ValueError(f"output {p} lies inside the input DICOM folder {q}; write it elsewhere")
    # Last: a read-only folder must stop the job now, not after minutes of work (and the rename's
    # error would name the temporary file).
    check_writable(p, "output")
    return p


def write_label(path: str | os.PathLike, array: np.ndarray, geometry: Geometry) -> Path:
    """Write a [k, j, i] label map with exactly `geometry`, atomically (temp file + os.replace).

    A .png output needs a one-slice grid and is written as an 8-bit 2D image. Nothing is left at
    `path` (nor a temporary file) when writing fails.
    """
    import SimpleITK as sitk

    p = Path(path)
    arr = np.asarray(array)
    if arr.shape != geometry.array_shape:
        raise ValueError(f"label array shape {arr.shape} does not match the grid {geometry.array_shape} (k, j, i)")
    if arr.min(initial=0) < 0:
        raise ValueError("label values must be >= 0")
    suffix = _suffix(p)
    dtype = np.uint8 if arr.max(initial=0) <= 255 else np.uint16
    with atomic_output(p) as tmp:
        if suffix == ".png":
            from PIL import Image

            if arr.shape[0] != 1 or dtype != np.uint8:
                raise ValueError("a .png output needs a one-slice 2D image with labels <= 255; use .nii.gz")
            Image.fromarray(arr[0].astype(np.uint8)).save(tmp, format="PNG")
        else:
            image = sitk.GetImageFromArray(arr.astype(dtype))
            geometry.apply_to_sitk(image)
            sitk.WriteImage(image, tmp, True)
    return p
