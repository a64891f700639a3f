"""The one place where coordinate frames are converted. Nothing else in the project flips axes.

Frames:
    IJK    voxel index (i, j, k) as SimpleITK orders it; numpy arrays from SimpleITK or Slicer are
           indexed [k, j, i].
    LPS    physical millimetres as SimpleITK and DICOM use them.
    RAS    physical millimetres as 3D Slicer uses them: RAS = diag(-1, -1, 1) @ LPS.
    (x, y) (column, row) pixels of a 2D slice taken along one array axis (see `slice_axes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel grid geometry in SimpleITK's convention (LPS, index order (i, j, k)).

    spacing: (3,) mm along i, j, k.  origin: (3,) LPS mm of voxel (0, 0, 0).
    direction: (3, 3) with columns = LPS unit vectors of the i, j, k axes.
    size: (3,) voxel counts along i, j, k (array shape is size[::-1]).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK's GetDirection()
    size: tuple[int, int, int]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of the numpy array, (k, j, i)."""
        return (int(self.size[2]), int(self.size[1]), int(self.size[0]))

    def ijk_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to (L, P, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(np.asarray(self.spacing, dtype=np.float64))
        m[:3, 3] = np.asarray(self.origin, dtype=np.float64)
        return m

    def ijk_to_ras_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to (R, A, S, 1): Slicer's IJKToRAS."""
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        return flip @ self.ijk_to_lps_matrix()

    def ijk_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous (i, j, k) -> (N, 3) LPS mm."""
        return _apply(self.ijk_to_lps_matrix(), ijk)

    def lps_to_ijk(self, lps: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) continuous (i, j, k)."""
        return _apply(np.linalg.inv(self.ijk_to_lps_matrix()), lps)

    def ijk_to_ras(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous (i, j, k) -> (N, 3) RAS mm."""
        return _apply(self.ijk_to_ras_matrix(), ijk)

    def same_grid(self, other: Geometry, tol: float = 1e-3) -> bool:
        """True when both describe the same voxel grid (size equal, spacing/origin/direction within tol)."""
        return (
            tuple(self.size) == tuple(other.size)
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    @classmethod
    def from_sitk(cls, image) -> Geometry:  # image: SimpleITK.Image (3D)
        return cls(
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            size=tuple(int(v) for v in image.GetSize()),
        )

    def apply_to_sitk(self, image) -> None:
        """Copy spacing, origin and direction onto a SimpleITK image of the same size."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    if pts.shape[-1] != 3:
        raise ValueError(f"expected (N, 3) points, got shape {pts.shape}")
    return pts @ matrix[:3, :3].T + matrix[:3, 3]


def axial_axis(geometry: Geometry) -> int:
    """Array axis (0 = k, 1 = j, 2 = i of a [k, j, i] array) whose direction is closest to S (superior).

    This is the axis to slice along for axial slices, whatever the direction matrix.
    """
    d = geometry.direction_matrix  # columns: LPS direction of i, j, k
    ijk_axis = int(np.argmax(np.abs(d[2, :])))  # largest S component
    return 2 - ijk_axis


def orientation(geometry: Geometry) -> str:
    """ITK's three-letter code of the anatomical directions nearest the i, j, k axes of `geometry`
    (SimpleITK's `DICOMOrientImageFilter`; e.g. "LPS": i runs towards the patient's left, j
    posterior, k superior)."""
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(geometry.direction))


def reorient(array: np.ndarray, geometry: Geometry, code: str) -> tuple[np.ndarray, Geometry]:
    """The [k, j, i] `array` on `geometry` with its axes permuted and reversed, nothing resampled, so
    that they run as the orientation `code` says (`orientation`; SimpleITK's DICOMOrient), and the
    geometry of the result: the same voxels at the same LPS points."""
    import SimpleITK as sitk

    a = np.asarray(array)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.astype(np.uint8) if a.dtype == bool else a))
    geometry.apply_to_sitk(img)
    out = sitk.DICOMOrient(img, code)
    moved = sitk.GetArrayFromImage(out)
    return (moved.astype(bool) if a.dtype == bool else moved), Geometry.from_sitk(out)


def reoriented_axis(before: Geometry, after: Geometry, axis: int) -> int:
    """The array axis of [k, j, i] on `after` (`reorient`'s result) that runs along array axis `axis`
    of `before`, one way or the other."""
    along = before.direction_matrix[:, 2 - axis]
    return 2 - int(np.argmax(np.abs(after.direction_matrix.T @ along)))


def slice_axes(axis: int) -> tuple[int, int]:
    """For slices taken along array axis `axis`, the array axes that become (row, column) = (y, x).

    axis 0 (k): rows = j, cols = i;  axis 1 (j): rows = k, cols = i;  axis 2 (i): rows = k, cols = j.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"slice axis must be 0, 1 or 2 (array axes of [k, j, i]), got {axis}")
    rows, cols = [a for a in (0, 1, 2) if a != axis]
    return rows, cols


def point_pixels(points_xy: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) int arrays: the nearest pixel of each (x, y) = (column, row) point of (N, 2)
    `points_xy`, clipped into an image of `shape` (H, W, ...)."""
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    cols = np.clip(np.rint(pts[:, 0]).astype(int), 0, shape[1] - 1)
    rows = np.clip(np.rint(pts[:, 1]).astype(int), 0, shape[0] - 1)
    return rows, cols


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice of a [k, j, i] array along `axis`, as (H, W) = (rows, cols) per `slice_axes` (a view)."""
    if not 0 <= index < volume.shape[axis]:
        raise ValueError(f"slice {index} is outside 0..{volume.shape[axis] - 1} along axis {axis}")
    return np.take(volume, index, axis=axis)


def put_slice(volume: np.ndarray, axis: int, index: int, values: np.ndarray) -> None:
    """Write an (H, W) slice back into a [k, j, i] array in place (inverse of `take_slice`)."""
    target = [slice(None)] * 3
    target[axis] = index
    volume[tuple(target)] = values


def slice_xy_to_ijk(points_xy: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(N, 2) slice (x, y) = (column, row) on slice `index` along `axis` -> (N, 3) continuous (i, j, k)."""
    pts = np.atleast_2d(np.asarray(points_xy, dtype=np.float64)).reshape(-1, 2)
    rows, cols = slice_axes(axis)
    kji = np.zeros((len(pts), 3))
    kji[:, axis] = index
    kji[:, rows] = pts[:, 1]
    kji[:, cols] = pts[:, 0]
    return kji[:, ::-1].copy()


def ijk_to_slice_xy(ijk: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) continuous (i, j, k) -> ((N, 2) slice (x, y), (N,) slice position along `axis`, continuous)."""
    kji = np.atleast_2d(np.asarray(ijk, dtype=np.float64))[:, ::-1]
    rows, cols = slice_axes(axis)
    return np.stack([kji[:, cols], kji[:, rows]], axis=1), kji[:, axis]


# --- Slicer adapters: IJKToRAS matrices, parent transforms, voxel rounding and bounds -----------------

RAS_TO_LPS = LPS_TO_RAS  # the flip is its own inverse


def lps_to_ras(points: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm -> (N, 3) RAS mm."""
    return np.atleast_2d(np.asarray(points, dtype=np.float64)) @ LPS_TO_RAS.T


def ras_to_lps(points: np.ndarray) -> np.ndarray:
    """(N, 3) RAS mm -> (N, 3) LPS mm."""
    return np.atleast_2d(np.asarray(points, dtype=np.float64)) @ RAS_TO_LPS.T


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, size: tuple[int, int, int]) -> Geometry:
    """Geometry (LPS) from Slicer's 4x4 IJKToRAS matrix and the voxel counts (ni, nj, nk).

    The 3x3 part is D_ras @ diag(spacing); its columns' norms are the spacing. Shear is rejected
    because a Geometry (like an ITK image) cannot represent it.
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"IJKToRAS must be 4x4, got shape {m.shape}")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise ValueError("IJKToRAS has a zero-length or non-finite axis")
    d_ras = m[:3, :3] / spacing
    if not np.allclose(d_ras.T @ d_ras, np.eye(3), atol=1e-4):
        raise ValueError("IJKToRAS axes are not orthogonal (sheared grid); resample the volume first")
    d_lps = LPS_TO_RAS @ d_ras
    o_lps = LPS_TO_RAS @ m[:3, 3]
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be three positive voxel counts (ni, nj, nk), got {size}")
    return Geometry(
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in o_lps),
        direction=tuple(float(v) for v in d_lps.reshape(-1)),
        size=tuple(int(v) for v in size),
    )


def ijk_to_world_ras_matrix(geometry: Geometry, parent_to_world: np.ndarray | None = None) -> np.ndarray:
    """4x4 mapping (i, j, k, 1) to world RAS: parent_to_world @ IJKToRAS.

    parent_to_world: the 4x4 linear transform from the volume's local RAS frame to world RAS (Slicer's
    parent transform, `GetMatrixTransformToWorld`); None means the volume is not transformed.
    """
    m = geometry.ijk_to_ras_matrix()
    if parent_to_world is not None:
        p = np.asarray(parent_to_world, dtype=np.float64)
        if p.shape != (4, 4):
            raise ValueError(f"parent transform must be a 4x4 matrix, got shape {p.shape}")
        m = p @ m
    return m


def ijk_to_world_ras(ijk: np.ndarray, geometry: Geometry, parent_to_world: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) continuous (i, j, k) -> (N, 3) world RAS mm (through the parent transform, if any)."""
    return _apply(ijk_to_world_ras_matrix(geometry, parent_to_world), ijk)


def world_ras_to_ijk(ras: np.ndarray, geometry: Geometry, parent_to_world: np.ndarray | None = None) -> np.ndarray:
    """(N, 3) world RAS mm -> (N, 3) continuous (i, j, k) (undoing the parent transform, if any)."""
    return _apply(np.linalg.inv(ijk_to_world_ras_matrix(geometry, parent_to_world)), ras)


def round_ijk(ijk: np.ndarray) -> np.ndarray:
    """(N, 3) continuous (i, j, k) -> (N, 3) int voxel index, floor(v + 0.5) (ties go up, as in Slicer).

    np.round would send 2.5 to 2 and 3.5 to 4 (banker's rounding); one rule everywhere avoids the
    half-voxel disagreements that misplace clicks.
    """
    return np.floor(np.atleast_2d(np.asarray(ijk, dtype=np.float64)) + 0.5).astype(np.int64)


def inside_volume(ijk: np.ndarray, geometry: Geometry, tol: float = 1e-6) -> np.ndarray:
    """(N,) bool: continuous (i, j, k) lies within the voxels' extent (-0.5 .. size-0.5 on each axis)."""
    pts = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    size = np.asarray(geometry.size, dtype=np.float64)
    return np.all((pts >= -0.5 - tol) & (pts <= size - 0.5 + tol), axis=1)


def check_inside_volume(ijk: np.ndarray, geometry: Geometry, what: str = "point") -> None:
    """Raise ValueError naming the first (i, j, k) outside the volume (see `inside_volume`)."""
    pts = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    ok = inside_volume(pts, geometry)
    if not np.all(ok):
        n = int(np.argmin(ok))
        # The index only tells points apart when there are several; %g keeps a hand-edited 1e300
        # down to a few characters.
        name = f"{what} {n}" if len(pts) > 1 else what
        coords = ", ".join(f"{v:.6g}" for v in pts[n])
        raise ValueError(
            f"{name} at IJK ({coords}) lies outside the volume of size {tuple(int(s) for s in geometry.size)}"
        )


def slice_shape(geometry: Geometry, axis: int) -> tuple[int, int]:
    """(H, W) of the 2D slices taken along `axis` (rows, cols per `slice_axes`)."""
    rows, cols = slice_axes(axis)
    shape = geometry.array_shape
    return int(shape[rows]), int(shape[cols])


def slice_spacing(geometry: Geometry, axis: int) -> tuple[float, float, float]:
    """Millimetres between slices along `axis`, and between the rows and the columns of a slice."""
    rows, cols = slice_axes(axis)
    sp = [float(v) for v in geometry.spacing][::-1]  # spacing is (i, j, k); [k, j, i] array axes
    return sp[axis], sp[rows], sp[cols]


def slice_xy_to_ras(
    points_xy: np.ndarray,
    geometry: Geometry,
    axis: int,
    index: int,
    parent_to_world: np.ndarray | None = None,
) -> np.ndarray:
    """(N, 2) slice (x, y) on slice `index` along `axis` -> (N, 3) world RAS mm."""
    return ijk_to_world_ras(slice_xy_to_ijk(points_xy, axis, index), geometry, parent_to_world)


def ras_to_slice_xy(
    ras: np.ndarray,
    geometry: Geometry,
    axis: int,
    parent_to_world: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) world RAS -> ((N, 2) continuous slice (x, y), (N,) int nearest slice index along `axis`).

    The point is projected onto the nearest voxel slice (rounded with `round_ijk`'s rule); no bounds
    check here, see `check_inside_volume`.
    """
    ijk = world_ras_to_ijk(ras, geometry, parent_to_world)
    xy, pos = ijk_to_slice_xy(ijk, axis)
    return xy, np.floor(pos + 0.5).astype(np.int64)


def view_axis(geometry: Geometry, view: str = "axial") -> int:
    """Array axis (0 = k, 1 = j, 2 = i) whose direction is closest to a view's normal.

    view: "axial" (S), "coronal" (A/P), "sagittal" (R/L). LPS and RAS agree on which axis is
    closest, since the flip only changes signs.
    """
    row = {"sagittal": 0, "coronal": 1, "axial": 2}.get(view)
    if row is None:
        raise ValueError(f"view must be axial, coronal or sagittal, got {view!r}")
    return 2 - int(np.argmax(np.abs(geometry.direction_matrix[row, :])))
