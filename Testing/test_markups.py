"""Prompts <-> Slicer markups `.mrk.json`: round trip on real geometries, malformed files, and Slicer's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.io.coords import Geometry, axial_axis, slice_shape
from FoBSegmentLib.io.markups import (
    SCHEMA_URL,
    parse_point_description,
    read_prompt_markups,
    write_prompt_markups,
)
from FoBSegmentLib.prompts import PromptSet


def _dicom_geometry(data_dir: Path) -> Geometry:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data_dir / "dicom_series" / "chaos_mr_t2spir_2")))
    reader.MetaDataDictionaryArrayUpdateOff()
    info = reader.Execute()
    return Geometry.from_sitk(info)


def _nifti_geometry(path: Path) -> Geometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry(
        spacing=reader.GetSpacing(), origin=reader.GetOrigin(), direction=reader.GetDirection(), size=reader.GetSize()
    )


def _random_prompts(geometry: Geometry, axis: int, slices: list[int], seed: int) -> dict[int, PromptSet]:
    rng = np.random.default_rng(seed)
    h, w = slice_shape(geometry, axis)
    out = {}
    for s in slices:
        nb, nf = rng.integers(1, 12), rng.integers(0, 4)
        out[s] = PromptSet(
            background=rng.uniform([0, 0], [w - 1, h - 1], size=(nb, 2)),
            foreground=rng.uniform([0, 0], [w - 1, h - 1], size=(nf, 2)),
        )
    return out


@pytest.fixture(scope="module")
def geometries(data_dir: Path) -> dict[str, Geometry]:
    return {
        "dicom": _dicom_geometry(data_dir),
        "chaos": _nifti_geometry(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"),
        "cmr_oblique": _nifti_geometry(data_dir / "cmr_bssfp" / "image_1.nii.gz"),
    }


@pytest.mark.parametrize("name", ["dicom", "chaos", "cmr_oblique"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_round_trip_every_axis(tmp_path: Path, geometries: dict[str, Geometry], name: str, axis: int) -> None:
    geom = geometries[name]
    n = geom.array_shape[axis]
    prompts = _random_prompts(geom, axis, sorted({0, n // 3, n - 1}), seed=axis)
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, prompts, geom, axis)
    back = read_prompt_markups(path, geom, axis)
    assert sorted(back) == sorted(prompts)
    for s, ps in prompts.items():
        np.testing.assert_allclose(back[s].background, ps.background, atol=1e-6)
        np.testing.assert_allclose(back[s].foreground, ps.foreground, atol=1e-6)
    assert not list(tmp_path.glob(".*.part*")), "temporary file left behind"


def test_file_content_is_lps_with_kind_and_slice(tmp_path: Path, geometries: dict[str, Geometry]) -> None:
    geom = geometries["dicom"]
    axis = axial_axis(geom)
    ps = PromptSet(background=[[10.0, 20.0], [30.5, 40.25]], foreground=[[100.0, 120.0]])
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, {7: ps}, geom, axis)
    doc = json.loads(path.read_text())
    assert doc["@schema"] == SCHEMA_URL
    names = [m["name"] for m in doc["markups"]]
    assert names == ["FoB background", "FoB foreground"]
    for m in doc["markups"]:
        assert m["type"] == "Fiducial" and m["coordinateSystem"] == "LPS"
    bg = doc["markups"][0]["controlPoints"]
    assert [p["label"] for p in bg] == ["b0", "b1"]
    desc = parse_point_description(bg[1]["description"])
    assert desc["kind"] == "background" and int(desc["slice"]) == 7 and int(desc["axis"]) == axis
    # independent check of the LPS position: SimpleITK's own index -> physical mapping of the series
    # (axial axis 0 -> (i, j, k) = (x, y, slice))
    img = sitk.Image([int(s) for s in geom.size], sitk.sitkUInt8)
    geom.apply_to_sitk(img)
    expected = img.TransformContinuousIndexToPhysicalPoint((30.5, 40.25, 7.0))
    np.testing.assert_allclose(bg[1]["position"], expected, atol=1e-6)


def test_points_snap_to_nearest_slice_and_edited_points_are_read(tmp_path: Path, geometries: dict[str, Geometry]) -> None:
    geom = geometries["chaos"]
    axis = 0
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, {5: PromptSet(background=[[50.0, 60.0]], foreground=[[80.0, 90.0]])}, geom, axis)
    doc = json.loads(path.read_text())
    # a person drags the background point 0.4 voxel off the slice plane and adds a foreground point with a
    # default Slicer label to the foreground list, in RAS this time
    normal = geom.direction_matrix[:, 2] * geom.spacing[2]
    doc["markups"][0]["controlPoints"][0]["position"] = list(
        np.asarray(doc["markups"][0]["controlPoints"][0]["position"]) + 0.4 * normal
    )
    lps_new = geom.ijk_to_lps([[12.0, 34.0, 9.0]])[0]
    doc["markups"][1]["coordinateSystem"] = "RAS"
    for p in doc["markups"][1]["controlPoints"]:
        p["position"] = [-p["position"][0], -p["position"][1], p["position"][2]]
    doc["markups"][1]["controlPoints"].append(
        {"label": "F-1", "position": [-lps_new[0], -lps_new[1], lps_new[2]], "positionStatus": "defined"}
    )
    doc["markups"][1]["controlPoints"].append({"label": "F-2", "position": [0, 0, 0], "positionStatus": "undefined"})
    path.write_text(json.dumps(doc))
    back = read_prompt_markups(path, geom, axis)
    assert sorted(back) == [5, 9]
    np.testing.assert_allclose(back[5].background, [[50.0, 60.0]], atol=1e-6)
    np.testing.assert_allclose(back[5].foreground, [[80.0, 90.0]], atol=1e-6)
    np.testing.assert_allclose(back[9].foreground, [[12.0, 34.0]], atol=1e-6)
    assert len(back[9].background) == 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("markups"), "no 'markups' list"),
        (lambda d: d.__setitem__("@schema", "https://example.org/other-schema.json"), "unsupported markups schema"),
        (lambda d: d["markups"][0].__setitem__("type", "Curve"), "is not a point list"),
        (lambda d: d["markups"][0].__setitem__("coordinateSystem", "XYZ"), "coordinateSystem"),
        (lambda d: d["markups"][0]["controlPoints"][0].__setitem__("position", [1, 2]), "'position' must be"),
        (lambda d: d["markups"][0]["controlPoints"][0].__setitem__("position", ["a", 2, 3]), "'position' must be"),
        (lambda d: d["markups"][0]["controlPoints"][0].__setitem__("position", [1e5, 0, 0]), "outside the volume"),
        (lambda d: [m.pop("name") for m in d["markups"]] and d["markups"][0]["controlPoints"][0].update(
            label="x", description="hello"), "cannot tell whether"),
    ],
)
def test_malformed_files_raise_value_error(tmp_path: Path, geometries: dict[str, Geometry], mutate, message: str) -> None:
    geom = geometries["chaos"]
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, {3: PromptSet(background=[[5.0, 6.0]], foreground=[[7.0, 8.0]])}, geom, 0)
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        read_prompt_markups(path, geom, 0)


def test_not_json_and_missing_file(tmp_path: Path, geometries: dict[str, Geometry]) -> None:
    bad = tmp_path / "bad.mrk.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompt_markups(bad, geometries["chaos"], 0)
    with pytest.raises(FileNotFoundError):
        read_prompt_markups(tmp_path / "missing.mrk.json", geometries["chaos"], 0)


def test_write_rejects_outside_points_and_keeps_old_file(tmp_path: Path, geometries: dict[str, Geometry]) -> None:
    geom = geometries["chaos"]
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, {1: PromptSet(background=[[5.0, 6.0]])}, geom, 0)
    before = path.read_text()
    with pytest.raises(ValueError, match="outside the volume"):
        write_prompt_markups(path, {1: PromptSet(background=[[5.0, 600.0]])}, geom, 0)
    with pytest.raises(ValueError, match="outside"):
        write_prompt_markups(path, {999: PromptSet(background=[[5.0, 6.0]])}, geom, 0)
    assert path.read_text() == before
    assert not list(tmp_path.glob(".*.part*"))


@pytest.mark.slicer
def test_file_loads_in_slicer_markups_logic_at_the_right_ras(tmp_path: Path, geometries: dict[str, Geometry]) -> None:
    slicer = pytest.importorskip("slicer")
    from slicer_fixtures import make_scene

    geom = geometries["cmr_oblique"]
    axis = 0
    prompts = _random_prompts(geom, axis, [2, 9], seed=3)
    path = tmp_path / "p.mrk.json"
    write_prompt_markups(path, prompts, geom, axis)
    scene, logics, cleanup = make_scene(slicer)
    try:
        assert logics["markups"].LoadMarkups(str(path), "FoB")
        nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
        got = {}
        for n in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(n)
            for c in range(node.GetNumberOfControlPoints()):
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPosition(c, pos)
                got[node.GetNthControlPointLabel(c)] = (pos, node.GetNthControlPointDescription(c))
        expected = {}
        counters = {"b": 0, "f": 0}
        for s in sorted(prompts):
            for prefix, pts in (("b", prompts[s].background), ("f", prompts[s].foreground)):
                ijk = np.stack([pts[:, 0], pts[:, 1], np.full(len(pts), s)], axis=1)  # axis 0: x = i, y = j
                for p in geom.ijk_to_ras(ijk):
                    expected[f"{prefix}{counters[prefix]}"] = p
                    counters[prefix] += 1
        assert sorted(got) == sorted(expected)
        for label, p in expected.items():
            np.testing.assert_allclose(got[label][0], p, atol=1e-4)
            assert parse_point_description(got[label][1])["kind"] == ("background" if label[0] == "b" else "foreground")
    finally:
        cleanup()
