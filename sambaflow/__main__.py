"""`python -m sambaflow inspect out/x/x.pef`: print what a PEF holds; `... report PEF`: the same and
more as one HTML page; `... cache list|verify|prune`."""

from __future__ import annotations

import argparse
import sys

from sambaflow.errors import SambaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sambaflow", description="sambaflow-open tools")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print a PEF's manifest: sections, tensors, versions")
    inspect.add_argument("pef", help="path to a .pef file")
    from sambaflow.app import cache_command
    from sambaflow.app.report import command as report_command

    cache_command.add_parser(commands)
    report_command.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "cache":
        return cache_command.run(args)
    from sambaflow.pef.inspect import describe

    try:
        if args.command == "report":
            print(f"wrote {report_command.run(args)}")
        else:
            print(describe(args.pef))
    except SambaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
