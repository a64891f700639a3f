"""Model weights: the registry in Resources/models.json, the user cache, downloads and verification.

Downloads go to `<cache>/weights/<file>` where <cache> is `--cache-dir`, else FOB_CACHE, else the
user cache (FoBSegmentLib.paths.cache_dir). A download streams into `<file>.part`, resumes an
interrupted `.part` with an HTTP Range request, checks the size and the SHA-256 (or the published
MD5 where that is all the publisher gives), and only then renames the file into place, so a file
under its final name is always complete. A local file the user names (`--sam-checkpoint PATH`)
never touches the network.

FOB_MODELS_JSON points at another registry file (tests, mirrors, air-gapped installs).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from FoBSegmentLib.paths import cache_dir, resources_dir

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download could not complete (network, server); the message says how to get the file by hand."""


class ChecksumError(ValueError):
    """A downloaded or local file does not match the registry's size or checksum."""


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint of the registry.

    name: registry id (also the segmenter name it feeds, where it feeds one).
    file: file name under <cache>/weights (or under Resources/ when `shipped`).
    url: download URL, None when the file cannot be fetched automatically.
    size: bytes, None when unknown. sha256 / md5: hex digests, None when unknown.
    licence, feeds, description, notes: text shown by `fob models list`.
    segmenter: the `get_segmenter` name this checkpoint serves, None for non-segmenter weights.
    shipped: True when the file lives in Resources/ (the project's own model), not in the cache.
    """

    name: str
    file: str
    url: str | None
    size: int | None
    sha256: str | None
    md5: str | None
    licence: str
    feeds: str
    segmenter: str | None
    description: str
    notes: str
    shipped: bool


def registry_path() -> Path:
    """The registry file: FOB_MODELS_JSON when set, else Resources/models.json."""
    override = os.environ.get("FOB_MODELS_JSON")
    return Path(override) if override else resources_dir() / "models.json"


def load_registry(path: str | Path | None = None) -> dict[str, ModelEntry]:
    """Read the registry into {name: ModelEntry}; ValueError for a malformed file."""
    path = Path(path) if path is not None else registry_path()
    if not path.is_file():
        raise FileNotFoundError(f"model registry not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model registry {path} is not valid JSON: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError(f"model registry {path} has no 'models' list")
    out: dict[str, ModelEntry] = {}
    for i, item in enumerate(models):
        if not isinstance(item, dict) or not item.get("name") or not item.get("file"):
            raise ValueError(f"model registry {path}: entry {i} needs at least 'name' and 'file'")
        size = item.get("size")
        out[item["name"]] = ModelEntry(
            name=str(item["name"]),
            file=str(item["file"]),
            url=item.get("url") or None,
            size=int(size) if size is not None else None,
            sha256=(item.get("sha256") or None),
            md5=(item.get("md5") or None),
            licence=str(item.get("licence", "")),
            feeds=str(item.get("feeds", "")),
            segmenter=item.get("segmenter") or None,
            description=str(item.get("description", "")),
            notes=str(item.get("notes", "")),
            shipped=bool(item.get("shipped", False)),
        )
    return out


def get_entry(name: str, registry: dict[str, ModelEntry] | None = None) -> ModelEntry:
    """The registry entry called `name`; ValueError listing the known names otherwise."""
    registry = registry if registry is not None else load_registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]


def weights_dir(cache: str | Path | None = None) -> Path:
    """Where downloaded checkpoints live: <cache>/weights (cache: argument, else FOB_CACHE, else user cache)."""
    return Path(cache if cache is not None else cache_dir()) / "weights"


def model_path(entry: ModelEntry, cache: str | Path | None = None) -> Path:
    """The path the entry's file has (or would have) on this machine."""
    return resources_dir() / entry.file if entry.shipped else weights_dir(cache) / entry.file


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def check_file(entry: ModelEntry, path: str | Path, full: bool = True) -> str:
    """Check a file against the entry: size always (when known), SHA-256 or MD5 when `full`.

    Returns a short description of what was checked; raises ChecksumError on a mismatch and
    FileNotFoundError when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{entry.name}: file not found: {path}")
    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ChecksumError(f"{entry.name}: {path} has {size} bytes, expected {entry.size}")
    if full and entry.sha256:
        got = file_digest(path, "sha256")
        if got.lower() != entry.sha256.lower():
            raise ChecksumError(f"{entry.name}: SHA-256 of {path} is {got}, expected {entry.sha256}")
        return "size and SHA-256 verified"
    if full and entry.md5:
        got = file_digest(path, "md5")
        if got.lower() != entry.md5.lower():
            raise ChecksumError(f"{entry.name}: MD5 of {path} is {got}, expected {entry.md5}")
        return "MD5 verified (no SHA-256 published)"
    if entry.size is not None:
        return "size verified" + ("" if full else " (hash not checked)")
    return "present (no size or checksum in the registry)"


def find_local(name: str, cache: str | Path | None = None, registry: dict[str, ModelEntry] | None = None) -> Path | None:
    """The entry's file when it exists with the registry's size (no hashing, cheap), else None."""
    entry = get_entry(name, registry)
    path = model_path(entry, cache)
    if not path.is_file():
        return None
    if entry.size is not None and path.stat().st_size != entry.size:
        return None
    return path


def _manual_hint(entry: ModelEntry, final: Path) -> str:
    what = "--sam-checkpoint PATH" if entry.segmenter else "its path"
    return f"download it yourself and pass {what} (or save it as {final})"


def download(
    name: str,
    cache: str | Path | None = None,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 3,
    registry: dict[str, ModelEntry] | None = None,
) -> Path:
    """Fetch a registry checkpoint into <cache>/weights and return its final path.

    A complete, verified file already there is returned without any network access. An existing
    `<file>.part` is resumed with a Range request; a connection that breaks mid-file is retried
    up to `retries` times, each resuming where the last stopped. After the bytes are in, size and
    checksum are checked; on a mismatch the partial file is deleted and ChecksumError is raised, so
    nothing unverified stays in the cache. Network failures raise DownloadError with the URL and
    the manual alternative.
    """
    entry = get_entry(name, registry)
    final = model_path(entry, cache)
    if entry.shipped:
        if final.is_file():
            return final
        raise FileNotFoundError(f"{entry.name} is shipped with FoBSegment but {final} is missing; reinstall")
    if final.is_file():
        try:
            check_file(entry, final, full=True)
            return final
        except ChecksumError:
            pass  # a corrupt file under the final name: fetch a fresh copy and replace it
    if not entry.url:
        raise DownloadError(f"{entry.name} has no download URL ({entry.notes or 'manual download only'}); "
                            f"{_manual_hint(entry, final)}")
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")

    attempt = 0
    while True:
        try:
            _fetch_into(entry, part, progress=progress, timeout=timeout)
            break
        except urllib.error.HTTPError as exc:
            raise DownloadError(
                f"could not download {entry.name} from {entry.url}: HTTP {exc.code} {exc.reason}; "
                f"{_manual_hint(entry, final)}"
            ) from exc
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as exc:
            attempt += 1
            if attempt > retries:
                reason = getattr(exc, "reason", None) or exc
                kept = f"; {part.stat().st_size} bytes kept in {part.name}, run again to resume" if part.is_file() else ""
                raise DownloadError(
                    f"could not download {entry.name} from {entry.url}: {reason}{kept}; {_manual_hint(entry, final)}"
                ) from exc

    try:
        check_file(entry, part, full=True)
    except ChecksumError as exc:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{exc}; the download was deleted, nothing was kept") from exc
    os.replace(part, final)
    return final


def _fetch_into(entry: ModelEntry, part: Path, *, progress: bool, timeout: float) -> None:
    """Stream entry.url into `part`, resuming from its current length with an HTTP Range request."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.is_file() else 0
    if entry.size is not None and offset > entry.size:
        part.unlink()
        offset = 0
    if entry.size is not None and offset == entry.size:
        return
    request = urllib.request.Request(entry.url, headers={"User-Agent": "FoBSegment"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The server says our .part already covers the file: let verification decide.
            return
        raise
    with response:
        status = getattr(response, "status", 200)
        if status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                raise http.client.HTTPException(f"server answered range {content_range!r} for offset {offset}")
            mode = "ab"
        else:
            # 200 = the server ignored the Range header: start over rather than append garbage.
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else entry.size
        with open(part, mode) as f, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=entry.file, disable=not progress, leave=False,
        ) as bar:
            written = offset
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if expected is not None and written < expected:
            raise http.client.IncompleteRead(b"", expected - written)


def verify(name: str, cache: str | Path | None = None, full: bool = True,
           registry: dict[str, ModelEntry] | None = None) -> tuple[bool, str]:
    """(ok, message) for one entry's local file; a missing file is (False, 'missing ...')."""
    entry = get_entry(name, registry)
    path = model_path(entry, cache)
    if not path.is_file():
        return False, f"missing ({path})"
    try:
        return True, f"{check_file(entry, path, full=full)} ({path})"
    except ChecksumError as exc:
        return False, str(exc)


def checkpoint_for(segmenter: str, cache: str | Path | None = None,
                   registry: dict[str, ModelEntry] | None = None) -> Path | None:
    """A local, size-checked checkpoint for a segmenter name (sam-vit-h, medsam, ...), or None."""
    try:
        registry = registry if registry is not None else load_registry()
    except (FileNotFoundError, ValueError):
        return None
    for entry in registry.values():
        if entry.segmenter == segmenter:
            path = find_local(entry.name, cache, registry)
            if path is not None:
                return path
    return None
