"""FoB checkpoints: save, read and validate the prompt generator's weights (like SAM's build_sam).

Formats (`save_checkpoint` picks by suffix):
- `.safetensors`: the state dict, with 'format', 'format_version' and 'config' (FoBConfig JSON) as
  string metadata;
- anything else: a torch file of {'format', 'format_version', 'config', 'state_dict'} holding only
  tensors and strings.

Reading never unpickles code: safetensors, or `torch.load(weights_only=True)` through
`load_weights_only`, which also serves SAM checkpoints, encoder weights and training states. A file
that is neither gives one ValueError line naming it; torch's own advice (re-run with weights_only
off) and its pickle warnings never reach the user, as following that advice would run the file's
code. `load_checkpoint` accepts exactly a FoB checkpoint of its own config, never strict=False.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn

from FoBSegmentLib.atomic import atomic_output
from FoBSegmentLib.model.config import FoBConfig
from FoBSegmentLib.paths import resources_dir

CHECKPOINT_FORMAT = "fob-prompt-generator"
CHECKPOINT_FORMAT_VERSION = "1"
DEFAULT_MODEL_NAME = "fob_lite.safetensors"
# The dermoscopy model (issue 21): the default for colour 2-D images (`fob segment`, `--protocol skin`).
SKIN_MODEL_NAME = "fob_skin_lite.safetensors"
NOT_A_CHECKPOINT = "not a safetensors file or a weights-only PyTorch checkpoint"

M = TypeVar("M", bound=nn.Module)


def default_model_path() -> Path:
    """The shipped model, Resources/fob_lite.safetensors (FOB_RESOURCES overrides the folder)."""
    return resources_dir() / DEFAULT_MODEL_NAME


def skin_model_path() -> Path:
    """The shipped dermoscopy model, Resources/fob_skin_lite.safetensors (FOB_RESOURCES overrides)."""
    return resources_dir() / SKIN_MODEL_NAME


def load_weights_only(path: str | Path, what: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, or ValueError
    "<file> is not a <what> (not a safetensors file or a weights-only PyTorch checkpoint)".

    what: the kind of file the user meant to give ("FoB checkpoint", "SAM checkpoint", ...).
    """
    path = Path(path)
    try:
        # torch warns about pickle protocols it did not write; the file is refused or read either way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # junk bytes raise anything (KeyError, EOFError, UnpicklingError, ...)
        # torch's message suggests weights_only=False, i.e. running the file's code: never pass it on.
        raise ValueError(f"{path.name} is not a {what} ({NOT_A_CHECKPOINT})") from None


def save_checkpoint(model: nn.Module, config: FoBConfig, path: str | Path) -> Path:
    """Write `model`'s weights and `config`; '.safetensors' -> safetensors, anything else -> torch file.

    Written atomically (temporary file in the target folder, then os.replace). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": config.to_json(),
    }
    with atomic_output(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, tmp, metadata=meta)
        else:
            torch.save({**meta, "state_dict": state}, tmp)
    return path


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors or torch checkpoint; ValueError for anything unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    # Zip files (PK) are torch's format; any other 8-byte head may be a safetensors header length.
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
            return meta, state
        except Exception:
            if path.suffix == ".safetensors":
                raise ValueError(f"{path.name} is not a FoB checkpoint (not a readable safetensors file)") from None
    obj = load_weights_only(path, "FoB checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path.name} is not a FoB prompt-generator checkpoint (no state_dict)")
    state = obj["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(
            f"{path.name} is not a FoB prompt-generator checkpoint (state_dict holds non-tensors)"
        )
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return meta, state


def _check_state(path: Path, own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """ValueError unless `state` has exactly the tensors (names, shapes, dtypes) of `own`."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise ValueError(f"{path.name} does not match its FoB config: tensors {', '.join(what)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
            raise ValueError(
                f"{path.name}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, "
                f"expected {tuple(v.shape)} {v.dtype}"
            )


def load_checkpoint(path: str | Path, build: Callable[[FoBConfig], M]) -> M:
    """The model `build(config)` with the weights of checkpoint `path` (on the CPU, mode unchanged).

    Raises FileNotFoundError when the file is missing, ValueError when it is corrupt, truncated, not
    a FoB checkpoint, or its tensors do not match its own config.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FoB checkpoint not found: {path}")
    meta, state = read_checkpoint(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path.name} is not a FoB prompt-generator checkpoint (format {meta.get('format')!r})")
    if str(meta.get("format_version")) != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(f"{path.name}: unsupported FoB checkpoint version {meta.get('format_version')!r}")
    try:
        config = FoBConfig.from_json(meta.get("config"))
    except ValueError as exc:
        raise ValueError(f"{path.name}: bad config in checkpoint: {exc}") from None
    model = build(config)
    _check_state(path, model.state_dict(), state)
    model.load_state_dict(state, strict=True)
    return model


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_FORMAT_VERSION",
    "DEFAULT_MODEL_NAME",
    "default_model_path",
    "load_checkpoint",
    "load_weights_only",
    "read_checkpoint",
    "save_checkpoint",
]
