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
