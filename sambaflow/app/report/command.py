"""`python -m sambaflow report PEF [-o OUT] [--measure | --sections-json FILE]`."""

from __future__ import annotations

import argparse
import os

from sambaflow.app.report.facts import read_facts
from sambaflow.app.report.measure import from_sections_json, measure_pef
from sambaflow.app.report.page import render
from sambaflow.atomic import atomic_write
from sambaflow.errors import SambaArgumentError
from sambaflow.pef.file import PefFile
from sambaflow.pef.sign import key_path, load_key, user_key


def add_parser(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="write one self-contained HTML page of a PEF: step, tensors, compile, trust, timings"
    )
    report.add_argument("pef", help="path to a .pef file")
    report.add_argument("-o", "--output", help="the HTML file (default: the PEF's path with .html)")
    how = report.add_mutually_exclusive_group()
    how.add_argument(
        "--measure",
        action="store_true",
        help="run the PEF's programs on made-up inputs (it holds no weights) and chart their times "
        "and memory; a compiled PEF's native code runs in this process",
    )
    how.add_argument("--sections-json", help="chart the times a `measure-sections --json FILE` run wrote")
    report.add_argument(
        "-n", "--num-iterations", type=int, default=20, help="timed runs per program (default 20)"
    )


def run(args: argparse.Namespace) -> str:
    """Write the report; returns its path."""
    if args.num_iterations < 1:
        raise SambaArgumentError(f"report: -n/--num-iterations must be at least 1, got {args.num_iterations}")
    key = load_key(key_path())
    pef = PefFile(args.pef, key, None if key else user_key())  # as inspect: your own key is known
    measurement = None
    if args.measure:
        measurement = measure_pef(pef, args.num_iterations)
    elif args.sections_json:
        measurement = from_sections_json(pef, args.sections_json)
    output = args.output or os.path.splitext(args.pef)[0] + ".html"
    page = render(read_facts(pef), measurement)
    with atomic_write(output) as handle:
        handle.write(page.encode())
    return output
