"""Image-embedding cache for SAM-style segmenters: an in-memory LRU plus an optional disk store.

Keys hash the exact pixels the image encoder sees (the uint8 RGB slice), its shape, and the model
identity (segmenter name + checkpoint path, size and modification time), so an edited prompt on the
same slice reuses the embedding and a different checkpoint never does. Disk entries are dicts of
tensors written with torch.save and read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from FoBSegmentLib.atomic import atomic_output


def image_key(image_u8: np.ndarray, model_key: str) -> str:
    """SHA-256 hex key of a (H, W, 3) uint8 image and a model identity string."""
    h = hashlib.sha256()
    h.update(model_key.encode("utf-8"))
    h.update(repr((image_u8.shape, str(image_u8.dtype))).encode("ascii"))
    h.update(np.ascontiguousarray(image_u8).tobytes())
    return h.hexdigest()


def resolve_disk_dir(disk_cache: str | Path | bool | None) -> Path | None:
    """None/False -> no disk cache; True -> <FoB cache>/embeddings; a path -> that folder."""
    if disk_cache is None or disk_cache is False:
        return None
    if disk_cache is True:
        from FoBSegmentLib.paths import cache_dir

        return cache_dir() / "embeddings"
    return Path(disk_cache)


class EmbeddingCache:
    """LRU of {name: tensor} entries, `max_items` in memory, optionally mirrored in `disk_dir`.

    Memory entries keep their tensors on the device they were computed on; disk entries are stored on
    the CPU. `hits`, `disk_hits` and `misses` count lookups (tests and profiling read them).
    """

    def __init__(self, max_items: int = 16, disk_dir: str | Path | bool | None = None) -> None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        self.max_items = int(max_items)
        self.disk_dir = resolve_disk_dir(disk_dir)
        self._items: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def _disk_path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / key[:2] / f"{key}.pt"

    def get(self, key: str, device: str | torch.device | None = None) -> dict[str, torch.Tensor] | None:
        """The entry for `key` (moved to `device` when loaded from disk), or None."""
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        if self.disk_dir is not None:
            path = self._disk_path(key)
            if path.is_file():
                try:
                    value = torch.load(path, map_location=device or "cpu", weights_only=True)
                except Exception:
                    # A truncated or foreign file is a cache miss, never an error for the user.
                    value = None
                if isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
                    self.disk_hits += 1
                    self._remember(key, value)
                    return value
        self.misses += 1
        return None

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        """Store an entry in memory and, with a disk_dir, atomically on disk."""
        self._remember(key, value)
        if self.disk_dir is not None:
            with atomic_output(self._disk_path(key), make_parents=True) as tmp:
                torch.save({k: v.detach().cpu() for k, v in value.items()}, tmp)

    def _remember(self, key: str, value: dict[str, torch.Tensor]) -> None:
        if self.max_items == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget the in-memory entries (the disk store is left alone)."""
        self._items.clear()
