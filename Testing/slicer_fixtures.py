"""A real, headless MRML scene for Logic tests (slicer-core wheel; see ../shared/docs/slicer_anchors.md section 14).

`make_scene(slicer)` builds a scene with the application logic and the Colors, Markups, Segmentations and
Volumes module logics registered (without them point lists get no JSON storage node), and installs the
`slicer.mrmlScene` / `slicer.modules` shim that `slicer.util`'s segment helpers need. The returned cleanup
restores the shim and clears the scene. `mrml` is the pytest fixture around it.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator

import pytest


def make_scene(slicer) -> tuple[object, dict[str, object], Callable[[], None]]:
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics: dict[str, object] = {}
    for name, cls in (
        ("colors", slicer.vtkSlicerColorLogic),
        ("markups", slicer.vtkSlicerMarkupsLogic),
        ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("volumes", slicer.vtkSlicerVolumesLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    logics["app"] = app
    saved = {key: getattr(slicer, key, None) for key in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        **{name: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for name, lg in logics.items() if name != "app"}
    )

    def cleanup() -> None:
        for key, value in saved.items():
            if value is None:
                if hasattr(slicer, key):
                    delattr(slicer, key)
            else:
                setattr(slicer, key, value)
        scene.Clear(1)

    return scene, logics, cleanup


@pytest.fixture
def mrml() -> Iterator[tuple[object, dict[str, object]]]:
    """(scene, logics) for one test; the slicer module is skipped where the wheel is unavailable."""
    slicer = pytest.importorskip("slicer")
    scene, logics, cleanup = make_scene(slicer)
    try:
        yield scene, logics
    finally:
        cleanup()


def oblique_volume(scene, transform, shape=(12, 14, 16)):
    """An oblique, anisotropic [k, j, i] int16 volume under a linear parent transform (4x4 numpy)."""
    import numpy as np
    import vtk

    from FoBSegmentLib.slicer import mrml as fob_mrml

    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    image = vtk.vtkImageData()
    fob_mrml.image_from_array(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), image)
    vol.SetAndObserveImageData(image)
    vol.SetSpacing(0.8, 1.1, 2.5)
    vol.SetOrigin(10.0, -20.0, 5.0)
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    directions = np.eye(4)
    directions[:3, :3] = rz @ rx
    vol.SetIJKToRASDirectionMatrix(fob_mrml.vtk_matrix(directions))
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    tnode.SetMatrixTransformToParent(fob_mrml.vtk_matrix(transform))
    vol.SetAndObserveTransformNodeID(tnode.GetID())
    return vol


def chaos_volume(scene, logics, data_dir, patient: str = "2"):
    """A CHAOS MR volume read by Slicer's own reader, and its reference label array on that grid."""
    from FoBSegmentLib.slicer import mrml as fob_mrml

    folder = data_dir / "chaos_mr_t2spir"
    vol = logics["volumes"].AddArchetypeVolume(str(folder / f"image_{patient}.nii.gz"), f"chaos{patient}")
    label = logics["volumes"].AddArchetypeVolume(str(folder / f"label_{patient}.nii.gz"), "reference", 1)
    reference = fob_mrml.volume_array(label)
    scene.RemoveNode(label)
    return vol, reference
