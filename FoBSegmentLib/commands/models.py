"""`fob models list | download NAME | verify [NAME]`: the checkpoints FoBSegment knows and the local cache.

    fob models list [--cache-dir D]                 registry entries, size, licence, local status
    fob models download NAME [--cache-dir D]        fetch into <cache>/weights (resumable, SHA-256 checked)
    fob models verify [NAME] [--cache-dir D]        re-hash local files (all present ones without NAME)

FOB_CACHE sets the default cache; FOB_MODELS_JSON points at another registry file.
"""

from __future__ import annotations

import argparse
import sys

from FoBSegmentLib import weights


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `models` sub-command to the `fob` parser."""
    p = subparsers.add_parser("models", help="list, download and verify model checkpoints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="models_command", metavar="ACTION")

    def add_cache(q: argparse.ArgumentParser) -> None:
        q.add_argument("--cache-dir", metavar="D", default=None,
                       help="FoB cache folder (weights go to D/weights); default FOB_CACHE or the user cache")

    q = sub.add_parser("list", help="show the registry and what is on this machine")
    add_cache(q)
    q.set_defaults(func=_list)
    q = sub.add_parser("download", help="download one checkpoint into the cache")
    q.add_argument("name", help="registry name, e.g. sam-vit-b")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cache(q)
    q.set_defaults(func=_download)
    q = sub.add_parser("verify", help="check size and SHA-256 of local checkpoints")
    q.add_argument("name", nargs="?", help="registry name (default: every file present)")
    add_cache(q)
    q.set_defaults(func=_verify)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def _list(args: argparse.Namespace) -> int:
    registry = weights.load_registry()
    print(f"registry: {weights.registry_path()}")
    print(f"weights:  {weights.weights_dir(args.cache_dir)}")
    for entry in registry.values():
        path = weights.model_path(entry, args.cache_dir)
        if weights.find_local(entry.name, args.cache_dir, registry) is not None:
            status = "present"
        elif path.is_file():
            status = "present, wrong size"
        else:
            status = "shipped file missing" if entry.shipped else ("not downloaded" if entry.url else "manual")
        print(f"{entry.name:<12} {_human(entry.size):>10}  {status:<15} {entry.description}")
        print(f"{'':<12} feeds: {entry.feeds}; licence: {entry.licence}")
        if entry.notes:
            print(f"{'':<12} note: {entry.notes}")
    return 0


def _download(args: argparse.Namespace) -> int:
    path = weights.download(args.name, args.cache_dir, progress=not args.no_progress and sys.stderr.isatty())
    ok, message = weights.verify(args.name, args.cache_dir, full=False)
    print(f"{args.name}: {path} ({message.split(' (')[0]})")
    return 0 if ok else 2


def _verify(args: argparse.Namespace) -> int:
    registry = weights.load_registry()
    names = [args.name] if args.name else [
        e.name for e in registry.values() if weights.model_path(e, args.cache_dir).is_file()
    ]
    if args.name:
        weights.get_entry(args.name, registry)
    if not names:
        print(f"no checkpoint present in {weights.weights_dir(args.cache_dir)}")
        return 0
    failed = 0
    for name in names:
        ok, message = weights.verify(name, args.cache_dir, full=True, registry=registry)
        print(f"{name}: {'OK' if ok else 'FAILED'} {message}")
        failed += not ok
    return 1 if failed else 0
