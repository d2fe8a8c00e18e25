"""`python -m sambaflow report PEF`: one self-contained HTML page, read back with html.parser (and
rendered once by headless Chromium where it is installed). The PEF is compiled for the reference
backend: nothing compiles."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

from sambaflow import samba
from sambaflow.__main__ import main
from sambaflow.app.compile import compile_pef
from sambaflow.app.report.facts import rewrites_applied, with_shapes
from sambaflow.passes.memory import peak_computed_bytes
from sambaflow.pef.file import PefFile

BATCH, SEQ = 4, 6


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(torch.tanh(self.embed(ids)).mean(1))
        return self.criterion(out, labels), out


@pytest.fixture(scope="module")
def pef(tmp_path_factory):
    """A training PEF (and its compile log) for the reference backend, with an option that has no
    effect (--o1) and a setting baked in at trace time (SGD without momentum)."""
    folder = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = TokenNet()
    samba.from_torch_model_(model)
    ids = samba.randint(20, (BATCH, SEQ), name="ids", batch_dim=0)
    labels = samba.randint(3, (BATCH,), name="labels", batch_dim=0)
    optim = samba.optim.SGD(model.parameters(), lr=0.1)
    config = {"output_folder": str(folder), "backend": "reference", "o1": True}
    path = compile_pef(model, [ids, labels], optim, name="tokens", config_dict=config)
    samba.session.reset()
    return path


class Page(HTMLParser):
    """The page as nested elements: (tag, attrs, children); text is kept as str children."""

    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.root: tuple = ("root", {}, [])
        self.stack = [self.root]
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        element = (tag, dict(attrs), [])
        self.stack[-1][2].append(element)
        if tag not in self.VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        while len(self.stack) > 1 and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        self.stack[-1][2].append(data)


def walk(element):
    yield element
    for child in element[2]:
        if isinstance(child, tuple):
            yield from walk(child)


def text(element) -> str:
    return "".join(c if isinstance(c, str) else text(c) for c in element[2])


def find(element, tag, **attrs):
    return [e for e in walk(element) if e[0] == tag and all(e[1].get(k) == v for k, v in attrs.items())]


def table_rows(table) -> list[list[str]]:
    body = find(table, "tbody")[0]
    return [[text(cell) for cell in find(row, "td")] for row in find(body, "tr")]


def report(pef_path, tmp_path, *options) -> Page:
    out = tmp_path / "report.html"
    assert main(["report", str(pef_path), "-o", str(out), *options]) == 0
    return Page(out.read_text())


def test_the_page_shows_the_step_tensors_compile_facts_and_trust(pef, tmp_path):
    page = report(pef, tmp_path)
    ids = {e[1]["id"] for e in walk(page.root) if "id" in e[1]}
    assert {"trust", "step", "tensors", "compile", "measured"} <= ids
    stored = PefFile(pef)
    train = find(page.root, "div", **{"class": "graph", "data-graph": "train"})[0]
    rows = [r for r in table_rows(find(train, "table")[0]) if r[0]]
    assert [r[0] for r in rows] == ["step", "fwd", "bckwd", "opt"]
    for name, _, nodes, inputs, outputs, binary in rows:
        program = stored.program("train", name)
        computed = [n for n in program.module.graph.nodes if n.op not in ("placeholder", "output")]
        assert (int(nodes), int(inputs), int(outputs), binary) == (
            len(computed), len(program.inputs), len(program.outputs), "none"
        )  # fmt: skip
    folds = {text(find(d, "summary")[0]): text(d) for d in find(page.root, "details")}
    assert "program fwd(" in folds["program fwd: graph text"]
    assert "section bckwd:" in folds["traced graph (graph.txt)"]
    assert "labels" in folds["program fwd: inputs and outputs"]
    compile_text = text(find(page.root, "section", id="compile")[0])
    for fact in ("reference", "no compiled binaries", "SGD[0]", "--o1: accepted but had no effect"):
        assert fact in compile_text
    trust = text(find(page.root, "section", id="trust")[0])
    assert "trust: signed with your own key" in trust and "native code: none" in trust
    assert "not measured" in text(find(page.root, "section", id="measured")[0])


def test_the_tensor_table_lists_every_tensor_with_its_bytes(pef, tmp_path):
    page = report(pef, tmp_path)
    entry = PefFile(pef).entry("train")
    table = find(page.root, "table", **{"class": "sortable tensors", "data-graph": "train"})[0]
    headers = [text(th) for th in find(table, "th")]
    assert headers == ["name", "role", "in/out", "shape", "dtype", "batch_dim", "bytes"]
    rows = {r[0] + "/" + r[2]: r for r in table_rows(table)}
    assert len(rows) == len(entry["inputs"]) + len(entry["outputs"])
    assert rows["ids/input"][1:] == ["input", "input", f"{BATCH}x{SEQ}", "int64", "0", f"{BATCH * SEQ * 8:,}"]
    assert rows["embed__weight/input"][6] == f"{20 * 8 * 4:,}"
    assert rows["criterion__outputs__0/output"][3] == "scalar"


def test_the_page_is_self_contained(pef, tmp_path):
    page = report(pef, tmp_path)
    policy = [
        e[1]["content"]
        for e in find(page.root, "meta")
        if e[1].get("http-equiv") == "Content-Security-Policy"
    ]
    assert policy and policy[0].startswith("default-src 'none'")
    assert not find(page.root, "link") and not find(page.root, "img") and not find(page.root, "iframe")
    for element in walk(page.root):
        assert "src" not in element[1], element
        assert element[1].get("href", "#").startswith("#"), element
    assert len(find(page.root, "script")) == 1 and len(find(page.root, "style")) == 1


def test_measure_charts_sections_the_floor_memory_and_tokens(pef, tmp_path):
    page = report(pef, tmp_path, "--measure", "-n", "2")
    charts = {e[1]["data-chart"]: e for e in find(page.root, "svg") if "data-chart" in e[1]}
    bars = {
        k: {g[1]["data-label"]: float(g[1]["data-value"]) for g in find(v, "g")} for k, v in charts.items()
    }
    assert list(bars["sections"]) == ["fwd", "bckwd", "opt", "whole step"]
    assert all(value > 0 for value in bars["sections"].values())
    assert bars["floor"]["floor"] > 0 and bars["floor"]["step"] == bars["sections"]["whole step"]
    step = with_shapes(PefFile(pef).program("train", "step").module)
    assert math.isclose(bars["memory"]["graph estimate"], peak_computed_bytes(step) / 2**20, rel_tol=1e-5)
    if sys.platform == "linux":
        assert "measured" in bars["memory"]
    throughput = text(find(page.root, "p", **{"class": "throughput"})[0])
    assert f"tokens/s ({BATCH * SEQ} tokens per step" in throughput


def test_times_from_a_measure_sections_json(pef, tmp_path, capsys):
    timings = tmp_path / "sections.json"
    timings.write_text(json.dumps({"median_s": {"fwd": 0.001, "bckwd": 0.002, "opt": 0.0005, "step": 0.003}}))
    page = report(pef, tmp_path, "--sections-json", str(timings))
    chart = [e for e in find(page.root, "svg") if e[1].get("data-chart") == "sections"][0]
    assert {g[1]["data-label"]: float(g[1]["data-value"]) for g in find(chart, "g")} == {
        "fwd": 1.0, "bckwd": 2.0, "opt": 0.5, "whole step": 3.0
    }  # fmt: skip
    assert f"from {timings}" in text(find(page.root, "section", id="measured")[0])
    timings.write_text('{"fwd": 1}')
    assert main(["report", pef, "-o", str(tmp_path / "x.html"), "--sections-json", str(timings)]) == 2
    assert "expected the JSON `measure-sections --json FILE` writes" in capsys.readouterr().err


def test_rewrites_applied_names_the_programs_each_rewrite_changes(pef):
    applied = rewrites_applied(PefFile(pef))
    assert set(applied["fast_tanh"]) == {"train/step", "train/fwd", "inference/step", "inference/fwd"}
    assert "train/opt" not in applied["fast_tanh"] and applied["explicit_alpha"] == []


CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None
)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_the_page_renders_in_headless_chromium_without_a_script_error(pef, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", pef, "-o", str(page), "--sections-json", _timings(tmp_path)]) == 0
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--dump-dom", page.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Uncaught" not in done.stderr, done.stderr[-2000:]
    rendered = Page(done.stdout)
    assert find(rendered.root, "html")[0][1].get("data-ready") == "yes"  # the script ran to its end


def _timings(folder) -> str:
    path = folder / "sections.json"
    path.write_text(json.dumps({"median_s": {"fwd": 0.001, "bckwd": 0.002, "opt": 0.0005, "step": 0.003}}))
    return str(path)
