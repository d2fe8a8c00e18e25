"""`python -m sambaflow cache list | verify | prune`: look after the compile cache (see README)."""

from __future__ import annotations

import argparse
import sys
import time

from sambaflow.backends.inductor.cache import CacheEntry, PackageCache, cache_dir_under, default_cache_dir

_DAY = 86400.0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The `cache` command and its sub-commands, on the `python -m sambaflow` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", help="cache root, as SAMBAFLOW_CACHE_DIR (packages in DIR/inductor); default: that variable"
    )
    cache = commands.add_parser("cache", help="list, verify or prune the compile cache")
    actions = cache.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="entries: program, size, age, torch, target")
    verify = actions.add_parser("verify", parents=[common], help="re-hash every entry; exit 1 if any is bad")
    verify.add_argument("--fix", action="store_true", help="remove the bad entries")
    prune = actions.add_parser("prune", parents=[common], help="remove entries")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries older than DAYS")
    prune.add_argument("--max-size", type=float, metavar="MB", help="oldest first, until the rest fit in MB")
    prune.add_argument("--all", action="store_true", help="every entry")
    prune.add_argument("--bad", action="store_true", help="entries that fail `verify`")


def run(args: argparse.Namespace) -> int:
    cache = PackageCache(cache_dir_under(args.dir) if args.dir else default_cache_dir())
    try:
        return {"list": _list, "verify": _verify, "prune": _prune}[args.action](cache, args)
    except OSError as exc:
        print(f"error: the compile cache {cache.root}: {exc}", file=sys.stderr)
        return 2


def _list(cache: PackageCache, args: argparse.Namespace) -> int:
    entries = cache.entries()
    _header(cache, entries)
    refused = cache.refused(create=False)
    if refused:
        print(f"  warning: {refused}")
    if entries:
        print(f"  {'program':<16} {'size':>9} {'age':>7}  {'torch':<18} {'target':<28} key")
    for entry in entries:
        print(
            f"  {entry.program:<16} {_mb(entry.size):>9} {_age(entry.created):>7}  "
            f"{entry.part('torch'):<18} {entry.part('target'):<28} {entry.key}"
        )
    return 0


def _verify(cache: PackageCache, args: argparse.Namespace) -> int:
    entries = cache.entries()
    _header(cache, entries)
    bad = _bad_entries(cache, entries)
    for entry, problem in bad:
        print(f"  BAD {entry.key} ({entry.program}): {problem}")
        if args.fix:
            cache.remove(entry)
            print(f"  removed {entry.key}")
    refused = cache.refused(create=False)
    if refused:
        print(f"  BAD folder: {refused}")
    print(
        f"{len(entries) - len(bad)} good, {len(bad)} bad" + (", bad ones removed" if args.fix and bad else "")
    )
    return 1 if (bad and not args.fix) or refused else 0


def _prune(cache: PackageCache, args: argparse.Namespace) -> int:
    if not (args.all or args.bad or args.older_than is not None or args.max_size is not None):
        print("error: say what to prune: --older-than DAYS, --max-size MB, --bad or --all", file=sys.stderr)
        return 2
    entries = cache.entries()
    doomed = _to_prune(cache, entries, args)
    for entry in entries:
        if entry.key in doomed:
            cache.remove(entry)
            print(
                f"  removed {entry.key} ({entry.program}, {_mb(entry.size)}, {_age(entry.created)} old): "
                f"{doomed[entry.key]}"
            )
    kept = [e for e in entries if e.key not in doomed]
    print(
        f"pruned {len(doomed)} of {len(entries)} entries in {cache.root}; {len(kept)} left, {_mb(_size(kept))}"
    )
    return 0


def _to_prune(cache: PackageCache, entries: list[CacheEntry], args: argparse.Namespace) -> dict[str, str]:
    """{key: why} for every entry the options select (entries are oldest first)."""
    now = time.time()
    doomed: dict[str, str] = {}
    for entry in entries:
        if args.all:
            doomed[entry.key] = "--all"
        elif args.older_than is not None and now - entry.created > args.older_than * _DAY:
            doomed[entry.key] = f"older than {args.older_than:g} days"
    if args.bad:
        doomed |= {e.key: f"bad: {p}" for e, p in _bad_entries(cache, entries) if e.key not in doomed}
    if args.max_size is not None:
        left = [e for e in entries if e.key not in doomed]
        while left and _size(left) > args.max_size * 1e6:
            doomed[left.pop(0).key] = f"the cache is over {args.max_size:g} MB"
    return doomed


def _bad_entries(cache: PackageCache, entries: list[CacheEntry]) -> list[tuple[CacheEntry, str]]:
    found = [(e, cache.problem(e)) for e in entries]
    return [(e, p) for e, p in found if p is not None]


def _header(cache: PackageCache, entries: list[CacheEntry]) -> None:
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    print(f"compile cache {cache.root}: {count}, {_mb(_size(entries))}")


def _size(entries: list[CacheEntry]) -> int:
    return sum(e.size for e in entries)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _age(created: float) -> str:
    seconds = max(time.time() - created, 0.0)
    for unit, length in (("d", _DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"
