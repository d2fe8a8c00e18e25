"""The report as one HTML page: inline CSS, inline SVG charts, a small inline script (table sorting,
fold all); its Content-Security-Policy lets it fetch nothing, so it works offline and leaks nothing."""

from __future__ import annotations

from html import escape
from typing import Any, Iterable

from sambaflow.app.report.facts import Facts, Graph, Program
from sambaflow.app.report.measure import GEMM_SIDE, Measurement

POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
#: set on <html> by the page's script once it ran to the end (tests look for it)
READY_ATTRIBUTE = "data-ready"

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:0 24px 48px;color:#1d2330}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d8dde6}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#5c6575}nav a{margin-right:14px}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{padding:3px 8px;border-bottom:1px solid #eceff4;
text-align:left;vertical-align:top}th{background:#f4f6fa;font-weight:600}td.num,th.num{text-align:right}
table.sortable th{cursor:pointer;user-select:none}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}pre{background:#f7f8fb;padding:8px;overflow:auto;
font-size:12px;max-height:480px}details{margin:4px 0}summary{cursor:pointer;color:#2a5bd7}
.trust{border-left:4px solid #c98a00;background:#fff8e6;padding:8px 12px}.trust.ok{border-color:#2f8f46;
background:#eefaf1}dt{font-weight:600;margin-top:8px}dd{margin:2px 0 0 16px}code{font-size:12px}
svg text{font:12px system-ui,sans-serif;fill:#1d2330}button{font:inherit;margin-left:8px}
"""

SCRIPT = """
(function () {
  function key(row, index, numeric) {
    var cell = row.cells[index];
    var text = cell.getAttribute("data-sort") || cell.textContent;
    return numeric ? parseFloat(text) : text.toLowerCase();
  }
  document.querySelectorAll("table.sortable th").forEach(function (th, index) {
    th.addEventListener("click", function () {
      var table = th.closest("table"), body = table.tBodies[0];
      var numeric = th.classList.contains("num");
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, th.cellIndex, numeric), y = key(b, th.cellIndex, numeric);
        return (x < y ? -1 : x > y ? 1 : 0) * (ascending ? 1 : -1);
      });
      rows.forEach(function (row) { body.appendChild(row); });
      table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    });
  });
  var button = document.getElementById("fold-all");
  button.addEventListener("click", function () {
    var open = button.textContent === "unfold all";
    document.querySelectorAll("details").forEach(function (d) { d.open = open; });
    button.textContent = open ? "fold all" : "unfold all";
  });
  document.documentElement.setAttribute("data-ready", "yes");
})();
"""


def render(facts: Facts, measurement: Measurement | None = None) -> str:
    """The whole page."""
    body = [
        _header(facts),
        _trust(facts),
        _measured(measurement),
        '<section id="step"><h2>The step</h2>',
        *(_graph_section(graph) for graph in facts.graphs),
        _fold("traced graph (graph.txt)", _pre(facts.graph_text)),
        "</section>",
        _tensors(facts.graphs),
        _compile(facts.compile),
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>PEF report: {escape(facts.name)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def _header(facts: Facts) -> str:
    p = facts.producer
    links = " ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("trust", "trust"),
            ("measured", "measured"),
            ("step", "step"),
            ("tensors", "tensors"),
            ("compile", "compile"),
        ]
    )
    return (
        f"<header><h1>{escape(facts.name)}</h1><p class=muted>{escape(facts.path)} &middot; created "
        f"{escape(facts.created)} &middot; sambaflow {escape(p.get('sambaflow', '?'))}, torch "
        f"{escape(p.get('torch', '?'))}, python {escape(p.get('python', '?'))} &middot; backend "
        f"<b>{escape(facts.backend)}</b> on {escape(facts.device)}"
        f"{' &middot; inference only' if facts.inference_only else ''}</p>"
        f'<nav>{links}<button id="fold-all" type="button">unfold all</button></nav></header>'
    )


def _trust(facts: Facts) -> str:
    verified = any(line.startswith("trust: signed, signature verified") for line in facts.trust)
    native = not any(line.startswith("native code: none") for line in facts.trust)
    kind = "trust ok" if verified or not native else "trust"
    items = "".join(f"<li>{escape(line)}</li>" for line in facts.trust)
    return f'<section id="trust"><h2>Trust</h2><div class="{kind}"><ul>{items}</ul></div></section>'


def _graph_section(graph: Graph) -> str:
    rows = "".join(_program_row(p) for p in graph.programs)
    extras = []
    if graph.loss_names:
        extras.append(f"losses: {escape(', '.join(graph.loss_names))}")
    if graph.hyper_defaults:
        extras.append(
            "run-time hyperparameters: "
            + escape(", ".join(f"{k}={v:g}" for k, v in graph.hyper_defaults.items()))
        )
    return (
        f'<div class="graph" data-graph="{escape(graph.kind)}"><h3>graph '
        f"'{escape(graph.kind)}'</h3><p class=muted>{graph.node_count} nodes; fingerprint "
        f"<code>{escape(graph.fingerprint[:16])}</code>{''.join('; ' + e for e in extras)}</p>"
        + _pipeline(graph.sections)
        + '<table class="programs"><thead><tr><th>program</th><th>what</th><th class=num>nodes</th>'
        "<th class=num>inputs</th><th class=num>outputs</th><th class=num>binary</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div>"
    )


def _program_row(program: Program) -> str:
    binary = _size(program.binary_bytes) if program.binary_bytes else "none"
    folds = _fold(f"program {program.name}: inputs and outputs", _names(program)) + _fold(
        f"program {program.name}: graph text", _pre(program.text)
    )
    return (
        f'<tr data-program="{escape(program.name)}"><td><b>{escape(program.name)}</b></td>'
        f"<td>{escape(program.role)}</td><td class=num>{program.node_count}</td>"
        f"<td class=num>{len(program.inputs)}</td><td class=num>{len(program.outputs)}</td>"
        f"<td class=num>{binary}</td></tr><tr><td></td><td colspan=5>{folds}</td></tr>"
    )


def _names(program: Program) -> str:
    return (
        f"<p><b>inputs</b>: {escape(', '.join(program.inputs)) or 'none'}</p>"
        f"<p><b>outputs</b>: {escape(', '.join(program.outputs)) or 'none'}</p>"
    )


def _pipeline(sections: list[str]) -> str:
    """The sections in order as boxes joined by arrows."""
    width, gap = 110, 36
    parts = []
    for i, name in enumerate(sections):
        x = i * (width + gap)
        parts.append(
            f'<rect x="{x}" y="4" width="{width}" height="32" rx="6" fill="#e8eefc" stroke="#2a5bd7"/>'
            f'<text x="{x + width / 2}" y="25" text-anchor="middle">{escape(name)}</text>'
        )
        if i:
            parts.append(
                f'<path d="M{x - gap + 4} 20 H{x - 6} m-6 -5 l6 5 l-6 5" fill="none" stroke="#5c6575"/>'
            )
    total = max(1, len(sections)) * (width + gap)
    return f'<svg class="pipeline" width="{total}" height="40" role="img" aria-label="sections">{"".join(parts)}</svg>'


def _tensors(graphs: list[Graph]) -> str:
    tables = []
    for graph in graphs:
        rows = "".join(_tensor_row(t) for t in graph.tensors)
        tables.append(
            f"<h3>graph '{escape(graph.kind)}': {len(graph.tensors)} tensors "
            f"({_size(sum(t['bytes'] for t in graph.tensors))})</h3>"
            f'<table class="sortable tensors" data-graph="{escape(graph.kind)}"><thead><tr><th>name</th>'
            "<th>role</th><th>in/out</th><th>shape</th><th>dtype</th><th class=num>batch_dim</th>"
            f"<th class=num>bytes</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return (
        '<section id="tensors"><h2>Tensors</h2><p class=muted>click a column to sort</p>'
        + "".join(tables)
        + "</section>"
    )


def _tensor_row(t: dict[str, Any]) -> str:
    shape = "x".join(map(str, t["shape"])) or "scalar"
    batch = "" if t.get("batch_dim") is None else str(t["batch_dim"])
    return (
        f"<tr><td>{escape(t['name'])}</td><td>{escape(t['role'])}</td><td>{t['io']}</td>"
        f"<td>{escape(shape)}</td><td>{escape(t['dtype'])}</td>"
        f'<td class=num data-sort="{batch or -1}">{batch}</td>'
        f'<td class=num data-sort="{t["bytes"]}">{t["bytes"]:,}</td></tr>'
    )


def _compile(c: dict[str, Any]) -> str:
    threads = c.get("threads") or {}
    rewrites = c.get("rewrites") or {}
    items = [
        ("backend", escape(c["backend"])),
        ("target", escape(c.get("target") or "no compiled binaries (the JSON graphs run op by op)")),
        ("threads", escape(f"compiled with {threads.get('torch', '?')} of {threads.get('cpus', '?')} CPUs")),
        ("compile cache", _list(c["cache"]) if c["cache"] else _cache_note(c)),
        ("rewrites applied", _rewrites(rewrites, c.get("rewrites_off", []))),
        (
            "baked in at trace time",
            _list(c["baked"]) if c["baked"] else "nothing: every setting is a run-time input",
        ),
        (
            "options that had no effect",
            _list(c["no_effect"]) if c["no_effect"] else "none: every given option took effect",
        ),
        ("compile arguments", _fold("all arguments", _pre(_args_text(c["args"])))),
    ]
    body = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return f'<section id="compile"><h2>Compile</h2><dl>{body}</dl></section>'


def _cache_note(c: dict[str, Any]) -> str:
    if c.get("log_found"):
        return "the compile log records no cache lookups (a backend without a cache)"
    return "no compile log beside the PEF (<code>NAME.compile.log</code>, written by compile)"


def _rewrites(applied: dict[str, list[str]], off: list[str]) -> str:
    if not applied:
        return "none: only the inductor backend rewrites graphs"
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code></td><td>"
        + (
            "turned off (SAMBAFLOW_REWRITES_OFF)"
            if name in off
            else escape(", ".join(where)) or "nothing to rewrite"
        )
        + "</td></tr>"
        for name, where in applied.items()
    )
    return f'<table class="rewrites"><thead><tr><th>rewrite</th><th>programs it changes</th></tr></thead><tbody>{rows}</tbody></table>'


def _measured(m: Measurement | None) -> str:
    if m is None:
        return (
            '<section id="measured"><h2>Measured</h2><p class=muted>not measured: run '
            "<code>python -m sambaflow report PEF --measure</code>, or pass <code>--sections-json FILE</code> "
            "from <code>measure-sections --json FILE</code></p></section>"
        )
    sections = [(name, seconds) for name, seconds in m.section_seconds.items() if name != "step"]
    parts = [
        f"<p class=muted>graph '{escape(m.kind)}', {escape(m.source)}, {m.threads} thread{'s' if m.threads != 1 else ''}</p>",
        f"<p class=trust>{escape(m.warning)}</p>" if m.warning else "",
        "<h3>time per section</h3>",
        _bars([(n, s * 1e3) for n, s in sections] + [("whole step", m.step_seconds * 1e3)], "ms", "sections"),
        "<h3>the step against its matrix-product floor</h3>",
        _bars([("step", m.step_seconds * 1e3), ("floor", m.floor_seconds * 1e3)], "ms", "floor"),
        f"<p class=muted>floor: the step's {m.matmul_flops / 1e6:,.1f} MFLOP of matrix products and "
        f"convolutions at this machine's float32 GEMM rate, {m.gemm_flops_per_s / 1e9:,.1f} GFLOP/s "
        f"(a {GEMM_SIDE}x{GEMM_SIDE} product); the step runs at {_ratio(m.step_seconds, m.floor_seconds)} of it</p>",
        "<h3>peak memory against the graph's estimate</h3>",
        _peak(m),
        f"<h3>throughput</h3><p class=throughput>{_throughput(m)}</p>",
    ]
    return '<section id="measured"><h2>Measured</h2>' + "".join(parts) + "</section>"


def _peak(m: Measurement) -> str:
    estimate = ("graph estimate", m.estimate_bytes / 2**20)
    note = (
        "<p class=muted>estimate: the computed tensors alive at once in program order (for an inductor "
        "PEF, elementwise chains fused into their users' kernels, as Inductor runs them); measured: "
        "how far one step raised the process's resident "
        "memory (high-water mark, after the memory pool and the C heap gave their free memory back)</p>"
    )
    if m.peak_bytes is None:
        return (
            _bars([estimate], "MiB", "memory")
            + "<p class=muted>measured peak: not available here (needs Linux /proc, and a run)</p>"
            + note
        )
    return _bars([("measured", m.peak_bytes / 2**20), estimate], "MiB", "memory") + note


def _throughput(m: Measurement) -> str:
    if not m.tokens:
        return f"{1 / m.step_seconds:,.1f} steps/s"
    rate = m.tokens / m.step_seconds
    return f"{rate:,.1f} {m.unit}/s ({m.tokens} {m.unit} per step, {m.step_seconds * 1e3:.3f} ms a step)"


def _bars(items: list[tuple[str, float]], unit: str, name: str) -> str:
    """A horizontal bar chart, one bar per (label, value)."""
    row, label_w, bar_w = 24, 120, 420
    top = max((v for _, v in items), default=0) or 1.0
    parts = []
    for i, (label, value) in enumerate(items):
        y, width = i * row, max(1.0, bar_w * value / top)
        parts.append(
            f'<g class="bar" data-label="{escape(label)}" data-value="{value:.6g}">'
            f'<text x="0" y="{y + 16}">{escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{width:.1f}" height="16" fill="#2a5bd7" rx="2"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{y + 16}">{value:,.3f} {unit}</text></g>'
        )
    height = row * len(items) + 4
    return f'<svg class="chart" data-chart="{name}" width="{label_w + bar_w + 120}" height="{height}" role="img" aria-label="{name}">{"".join(parts)}</svg>'


def _ratio(step: float, floor: float) -> str:
    return f"{step / floor:.1f}x" if floor else "(no matrix products)"


def _args_text(args: dict[str, Any]) -> str:
    return "\n".join(f"{k} = {v!r}" for k, v in sorted(args.items())) or "(none recorded)"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _fold(summary: str, content: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{content}</details>"


def _pre(text: str) -> str:
    return f"<pre>{escape(text)}</pre>"


def _list(lines: Iterable[str]) -> str:
    return "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>"
