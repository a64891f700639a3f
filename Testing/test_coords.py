"""Coordinate frames on real geometries: SimpleITK and slicer-core (with a parent transform) as references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.io.coords import (
    Geometry,
    axial_axis,
    check_inside_volume,
    geometry_from_ijk_to_ras,
    ijk_to_slice_xy,
    ijk_to_world_ras,
    inside_volume,
    lps_to_ras,
    orientation,
    put_slice,
    ras_to_lps,
    ras_to_slice_xy,
    reorient,
    reoriented_axis,
    round_ijk,
    slice_axes,
    slice_shape,
    slice_spacing,
    slice_xy_to_ijk,
    slice_xy_to_ras,
    take_slice,
    view_axis,
    world_ras_to_ijk,
)


def _read_dicom(data_dir: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data_dir / "dicom_series" / "chaos_mr_t2spir_2")))
    return reader.Execute()


@pytest.fixture(scope="module")
def images(data_dir: Path) -> dict[str, sitk.Image]:
    return {
        "dicom": _read_dicom(data_dir),
        "chaos": sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")),
        "cmr_oblique": sitk.ReadImage(str(data_dir / "cmr_bssfp" / "image_1.nii.gz")),
    }


def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _parent_transform(seed: int = 0) -> np.ndarray:
    """A rigid rotation of about 20 degrees plus a translation (a typical registration result)."""
    angle = np.deg2rad(20.0 + seed)
    c, s = np.cos(angle), np.sin(angle)
    m = np.eye(4)
    m[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    m[:3, 3] = [12.5, -30.0, 7.25]
    return m


@pytest.mark.parametrize("name", ["dicom", "chaos", "cmr_oblique"])
def test_ijk_to_lps_matches_simpleitk(images: dict[str, sitk.Image], name: str) -> None:
    img = images[name]
    geom = Geometry.from_sitk(img)
    rng = np.random.default_rng(1)
    ijk = rng.uniform(-0.5, np.asarray(img.GetSize()) - 0.5, size=(50, 3))
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(geom.ijk_to_lps(ijk), expected, atol=1e-6)
    np.testing.assert_allclose(geom.lps_to_ijk(expected), ijk, atol=1e-6)
    ras = geom.ijk_to_ras(ijk)
    np.testing.assert_allclose(ras, lps_to_ras(expected), atol=1e-6)
    np.testing.assert_allclose(ras_to_lps(ras), expected, atol=1e-6)
    # integer voxel index as SimpleITK rounds it
    for p in expected[:10]:
        idx = img.TransformPhysicalPointToIndex(tuple(p))
        np.testing.assert_array_equal(round_ijk(geom.lps_to_ijk([p]))[0], idx)


def test_dicom_slice_axis_is_flipped_but_axial_axis_found(images: dict[str, sitk.Image]) -> None:
    dicom, nifti = Geometry.from_sitk(images["dicom"]), Geometry.from_sitk(images["chaos"])
    # the README says the series' slice axis runs the other way: k goes inferior in DICOM, superior in NIfTI
    assert dicom.direction_matrix[2, 2] < 0 < nifti.direction_matrix[2, 2]
    assert axial_axis(dicom) == axial_axis(nifti) == 0 == view_axis(dicom, "axial")
    assert view_axis(nifti, "coronal") == 1 and view_axis(nifti, "sagittal") == 2
    # same voxels, reverse slice order: slice k of DICOM is slice n-1-k of the NIfTI at the same place
    n = dicom.size[2]
    p_dicom = dicom.ijk_to_lps([[100.0, 80.0, 3.0]])
    p_nifti = nifti.ijk_to_lps([[100.0, 80.0, n - 1 - 3.0]])
    np.testing.assert_allclose(p_dicom, p_nifti, atol=0.05)
    a = sitk.GetArrayViewFromImage(images["dicom"])
    b = sitk.GetArrayViewFromImage(images["chaos"])
    np.testing.assert_array_equal(take_slice(a, 0, 3), take_slice(b, 0, n - 1 - 3))


def test_the_dicom_series_reoriented_as_the_nifti_gives_its_voxels(images: dict[str, sitk.Image]) -> None:
    # The same patient stored feet first (NIfTI) and head first (DICOM): reordered to the NIfTI's axes,
    # the series holds the NIfTI's voxels, slice for slice, at the same points.
    dicom, nifti = Geometry.from_sitk(images["dicom"]), Geometry.from_sitk(images["chaos"])
    assert (orientation(dicom), orientation(nifti)) == ("LAI", "LAS")
    array, turned = reorient(sitk.GetArrayFromImage(images["dicom"]), dicom, "LAS")
    np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(images["chaos"]))
    assert orientation(turned) == "LAS" and turned.size == nifti.size
    np.testing.assert_allclose(turned.ijk_to_lps([[100.0, 80.0, 3.0]]), nifti.ijk_to_lps([[100.0, 80.0, 3.0]]), atol=0.05)
    assert reoriented_axis(dicom, turned, 0) == 0
    mask = sitk.GetArrayFromImage(images["dicom"]) > 300
    assert np.array_equal(reorient(mask, dicom, "LAS")[0], mask[::-1])  # (a bool mask stays bool)


def test_reoriented_axis_follows_a_permutation(images: dict[str, sitk.Image]) -> None:
    # A volume stored with its slices along i (a sagittal-first file) turned to the NIfTI's axes: the
    # slicing axis moves from array axis 2 to array axis 0 with the voxels.
    nifti = images["chaos"]
    permuted = sitk.PermuteAxes(nifti, [2, 0, 1])
    before = Geometry.from_sitk(permuted)
    array, after = reorient(sitk.GetArrayFromImage(permuted), before, orientation(Geometry.from_sitk(nifti)))
    np.testing.assert_array_equal(array, sitk.GetArrayViewFromImage(nifti))
    assert axial_axis(before) == 2 and reoriented_axis(before, after, 2) == 0 == axial_axis(after)


@pytest.mark.parametrize("name", ["dicom", "chaos", "cmr_oblique"])
def test_geometry_from_ijk_to_ras_round_trips(images: dict[str, sitk.Image], name: str) -> None:
    geom = Geometry.from_sitk(images[name])
    back = geometry_from_ijk_to_ras(geom.ijk_to_ras_matrix(), geom.size)
    assert back.same_grid(geom, tol=1e-9)
    sheared = geom.ijk_to_ras_matrix()
    sheared[0, 1] += 0.3
    with pytest.raises(ValueError, match="not orthogonal"):
        geometry_from_ijk_to_ras(sheared, geom.size)


@pytest.mark.parametrize("det_sign", [1, -1])
def test_random_oblique_parent_transform_round_trip(det_sign: int) -> None:
    rng = np.random.default_rng(7 + det_sign)
    d = _rotation(rng)
    d[:, 2] *= det_sign * np.sign(np.linalg.det(d))
    geom = Geometry(spacing=(0.7, 1.3, 4.0), origin=(3.0, -8.0, 100.0), direction=tuple(d.reshape(-1)), size=(40, 30, 12))
    parent = _parent_transform()
    ijk = rng.uniform(-0.5, np.asarray(geom.size) - 0.5, size=(100, 3))
    world = ijk_to_world_ras(ijk, geom, parent)
    local = geom.ijk_to_ras(ijk)
    np.testing.assert_allclose(world, local @ parent[:3, :3].T + parent[:3, 3], atol=1e-9)
    np.testing.assert_allclose(world_ras_to_ijk(world, geom, parent), ijk, atol=1e-9)
    for axis in (0, 1, 2):
        xy, pos = ijk_to_slice_xy(ijk, axis)
        idx = np.floor(pos + 0.5).astype(int)
        ras = slice_xy_to_ras(xy, geom, axis, 0, parent)  # on slice 0, then compare in-plane only
        xy_back, idx_back = ras_to_slice_xy(ras, geom, axis, parent)
        np.testing.assert_allclose(xy_back, xy, atol=1e-9)
        assert np.all(idx_back == 0)
        xy2, idx2 = ras_to_slice_xy(world, geom, axis, parent)
        np.testing.assert_allclose(xy2, xy, atol=1e-9)
        np.testing.assert_array_equal(idx2, idx)


def test_round_ijk_ties_and_bounds() -> None:
    np.testing.assert_array_equal(round_ijk([[2.5, 3.5, -0.5]]), [[3, 4, 0]])
    np.testing.assert_array_equal(round_ijk([[2.49, -0.51, 0.0]]), [[2, -1, 0]])
    geom = Geometry(spacing=(1, 1, 1), origin=(0, 0, 0), direction=tuple(np.eye(3).reshape(-1)), size=(4, 5, 6))
    assert inside_volume([[-0.5, 0, 0], [3.5, 4.5, 5.5]], geom).all()
    assert not inside_volume([[3.51, 0, 0]], geom)[0]
    assert not inside_volume([[0, -0.6, 0]], geom)[0]
    with pytest.raises(ValueError, match=r"point 1 at IJK \(0, 0, 6\)"):
        check_inside_volume([[0, 0, 0], [0, 0, 6]], geom)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_extraction_along_each_axis(images: dict[str, sitk.Image], axis: int) -> None:
    img = images["cmr_oblique"]
    geom = Geometry.from_sitk(img)
    arr = sitk.GetArrayFromImage(img)
    assert arr.shape == geom.array_shape
    index = geom.array_shape[axis] // 2
    sl = take_slice(arr, axis, index)
    assert sl.shape == slice_shape(geom, axis)
    rows, cols = slice_axes(axis)
    rng = np.random.default_rng(axis)
    for _ in range(20):
        y, x = rng.integers(0, sl.shape[0]), rng.integers(0, sl.shape[1])
        i, j, k = slice_xy_to_ijk([[x, y]], axis, index)[0].astype(int)
        # SimpleITK's own pixel access at that index is the value the slice shows at (row y, column x)
        assert img.GetPixel(int(i), int(j), int(k)) == sl[y, x]
    out = np.zeros_like(arr)
    put_slice(out, axis, index, sl)
    assert np.array_equal(take_slice(out, axis, index), sl)
    assert np.count_nonzero(np.delete(out, index, axis=axis)) == 0
    with pytest.raises(ValueError, match="outside"):
        take_slice(arr, axis, geom.array_shape[axis])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_spacing_names_the_millimetres_of_each_slice_axis(images: dict[str, sitk.Image], axis: int) -> None:
    img = images["chaos"]
    geom = Geometry.from_sitk(img)
    i_mm, j_mm, k_mm = img.GetSpacing()  # SimpleITK: (i, j, k)
    by_array_axis = {0: k_mm, 1: j_mm, 2: i_mm}  # [k, j, i] arrays
    rows, cols = slice_axes(axis)
    assert slice_spacing(geom, axis) == pytest.approx((by_array_axis[axis], by_array_axis[rows], by_array_axis[cols]))
    assert k_mm > 2 * i_mm  # CHAOS MR: thick slices, so the axes cannot be confused


FILES = {
    "chaos": "chaos_mr_t2spir/image_2.nii.gz",  # left-handed: Slicer reorders its slices on load
    "cmr_oblique": "cmr_bssfp/image_1.nii.gz",
    "dicom_grid": "dicom_series/chaos_mr_t2spir_2_label.nii.gz",
    "dicom": "dicom_series/chaos_mr_t2spir_2/IMG-0001.dcm",  # Slicer's archetype reader loads the series
}


@pytest.mark.slicer
@pytest.mark.parametrize("name", sorted(FILES))
def test_matches_slicer_reader_and_parent_transform(data_dir: Path, name: str) -> None:
    """Slicer's own reader and transform classes as the reference: the same physical point must hold the same
    voxel value in Slicer's array and SimpleITK's, and world positions must match vtkGeneralTransform's."""
    slicer = pytest.importorskip("slicer")
    vtk = pytest.importorskip("vtk")
    from slicer_fixtures import make_scene

    from FoBSegmentLib.slicer import mrml

    path = data_dir / FILES[name]
    img = _read_dicom(data_dir) if name == "dicom" else sitk.ReadImage(str(path))
    g_itk = Geometry.from_sitk(img)
    a_itk = sitk.GetArrayFromImage(img)
    scene, logics, cleanup = make_scene(slicer)
    try:
        vol = logics["volumes"].AddArchetypeVolume(str(path), name)
        g_slicer, p2w = mrml.volume_geometry(vol)
        assert g_slicer.size == g_itk.size
        a_slicer = mrml.volume_array(vol)
        assert p2w is None
        rng = np.random.default_rng(5)
        ijk = np.stack([rng.integers(0, s, 200) for s in g_itk.size], axis=1).astype(float)
        lps = g_itk.ijk_to_lps(ijk)
        ijk_s = g_slicer.lps_to_ijk(lps)
        np.testing.assert_allclose(ijk_s, np.round(ijk_s), atol=1e-3)  # voxel centres coincide
        idx_s = round_ijk(ijk_s)
        assert np.all(inside_volume(idx_s, g_slicer))
        i, j, k = ijk.astype(int).T
        si, sj, sk = idx_s.T
        assert np.array_equal(a_slicer[sk, sj, si], a_itk[k, j, i])

        tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        parent = _parent_transform(seed=3)
        tnode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(parent))
        vol.SetAndObserveTransformNodeID(tnode.GetID())
        got_geom, got_parent = mrml.volume_geometry(vol)
        assert got_geom.same_grid(g_slicer, tol=1e-9)
        np.testing.assert_allclose(got_parent, parent, atol=1e-9)
        m = vtk.vtkMatrix4x4()
        vol.GetIJKToRASMatrix(m)
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(tnode, None, to_world)
        pts = np.array([[0.0, 0.0, 0.0], [10.2, 200.7, 5.0], [g_slicer.size[0] - 1.0, 3.0, g_slicer.size[2] - 1.0]])
        for p, ours in zip(pts, ijk_to_world_ras(pts, got_geom, got_parent)):
            local = np.asarray(m.MultiplyPoint([*p, 1.0])[:3])
            np.testing.assert_allclose(to_world.TransformPoint(local), ours, atol=1e-6)
        np.testing.assert_allclose(world_ras_to_ijk(ijk_to_world_ras(pts, got_geom, got_parent), got_geom, got_parent),
                                   pts, atol=1e-9)
    finally:
        cleanup()
