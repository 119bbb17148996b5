"""Build reports: report.md and report.html inside the artifact, and JUnit XML for CI systems.

All three read the same records: the source's metrics and, per pass, its metrics and gate dict (as
`PassRecord.to_dict()` and the manifest hold them). Each metric names the eval backend that measured it
(hf, runtime, cpp or onnx); the reports show it beside the value and after each gate's metric. The HTML carries an inline SVG plot of each gate's drop
with its confidence interval against the allowed drop, so it needs no plotting library.
"""

from __future__ import annotations

import html
import xml.etree.ElementTree as ET
from pathlib import Path

REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def _unit(gate: dict) -> str:
    return "%" if gate["metric"] == "perplexity" else " pts"


def _delta(gate: dict) -> str:
    if gate.get("kind") == "speed":
        if gate["method"] == "not finite":
            return "not measured"
        return f"speedup {gate['speedup']:.3f}x [{gate['speedup_low']:.3f}, {gate['speedup_high']:.3f}] (required {gate['required']:.3f}x)"
    u = _unit(gate)
    return f"{gate['drop']:+.2f}{u} [{gate['ci_low']:+.2f}, {gate['ci_high']:+.2f}] (allowed {gate['max_drop']:.2f}{u})"


def _verdict(gate: dict) -> str:
    verdict = gate["verdict"]
    if verdict == "undecided":
        unit = "repeats" if gate.get("kind") == "speed" else "items"
        need = f", ~{gate['needed_n']} {unit} would decide" if gate["needed_n"] else ""
        return f"undecided ({'passes' if gate['passed'] else 'fails'} by on_undecided{need})"
    return verdict


def gate_rows(records: list[dict]) -> list[dict]:
    """One row per gated pass: pass name, its gate dict and the gate's metric with its backend."""
    return [{"pass": r["name"], "index": i, "gate": g, "metric": _gate_metric(r, g)} for i, r in enumerate(records) for g in r["gates"]]


def _backend(metrics: dict, metric: str) -> str:
    """The eval backend that measured `metric` ('' where the record does not say: speed metrics, old manifests)."""
    return (metrics.get(metric) or {}).get("backend") or ""


def _gate_metric(rec: dict, gate: dict) -> str:
    """The gate's metric, with the backend that measured it: `arc_easy.acc [runtime]`."""
    backend = "" if gate.get("kind") == "speed" else _backend(rec.get("metrics") or {}, gate["metric"])
    return f"{gate['metric']} [{backend}]" if backend else gate["metric"]


def _cell(rec: dict, gates: list[dict]) -> str:
    return "<br>".join(f"{_gate_metric(rec, g)}: {_delta(g)}: {_verdict(g)}" for g in gates) or "-"


def summary_rows(records: list[dict]) -> list[tuple[str, str, str]]:
    """Per pass: (name, its quality gates, its speed gates), side by side."""
    return [(r["name"], _cell(r, [g for g in r["gates"] if g.get("kind") != "speed"]), _cell(r, [g for g in r["gates"] if g.get("kind") == "speed"])) for r in records]


def _speed_lines(rec: dict) -> list[str]:
    speed = rec.get("speed") or []
    if not speed:
        return []
    lines = ["", "| speed metric | baseline | measured | speedup [CI] | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {g['metric']} | {g['baseline']:.4g} | {g['measured']:.4g} | {_delta(g)} | {_verdict(g)} |" for g in speed]
    m, w = speed[0]["machine"], speed[0]["workload"]
    lines.append(f"\nSpeed measured on {m.get('cpu')} ({m.get('cores')} cores{', ' + m['gpu'] if m.get('gpu') else ''}, torch {m.get('torch')}), "
                 f"{w['backend']} on {w['device']}: {w['num_requests']} requests of {w['input_len']} in / {w['output_len']} out, concurrency {w['concurrency']}, "
                 f"threads {w['threads'] or 'default'}, {speed[0]['n']} interleaved rounds{' (cached)' if speed[0].get('cached') else ''}; method {speed[0]['method']}")
    return lines


def markdown(name: str, source_metrics: dict, records: list[dict]) -> str:
    lines = [f"# {name}: build report"]
    if records:
        lines += ["", "## Quality and speed per pass", "", "| pass | quality | speed |", "| --- | --- | --- |"]
        lines += [f"| {n} | {q} | {s} |" for n, q, s in summary_rows(records)]
    lines += ["", "## Source model", "", "| metric | value | stderr | n | backend |", "| --- | --- | --- | --- | --- |"]
    for metric, res in sorted(source_metrics.items()):
        stderr = res.get("stderr")
        lines.append(f"| {metric} | {res['value']:.4f} | {'' if stderr is None else f'{stderr:.4f}'} | {res.get('n', '')} | {res.get('backend', '')} |")
    for i, rec in enumerate(records):
        lines += ["", f"## Pass {i}: {rec['name']}", "", f"{rec['seconds']:.1f} s{' (cached)' if rec.get('cached') else ''}, weights {rec['weight_bytes'] / 1e6:.1f} MB", ""]
        lines += ["| metric | value | n | backend |", "| --- | --- | --- | --- |"]
        lines += [f"| {m} | {res['value']:.4f} | {res.get('n', '')} | {res.get('backend', '')} |" for m, res in sorted(rec.get("metrics", {}).items())]
        gate = next((g for g in rec.get("gates", []) if g.get("kind") != "speed"), None)
        if gate:
            lines += ["", "| gate metric | baseline | measured | drop [CI] | verdict |", "| --- | --- | --- | --- | --- |"]
            lines.append(f"| {_gate_metric(rec, gate)} | {gate['baseline']:.4f} | {gate['measured']:.4f} | {_delta(gate)} | {_verdict(gate)} |")
            lines.append(f"\nRule: {gate['rule']}" + f"; method {gate['method']}" + (f"; McNemar p = {gate['p_value']:.3g}" if gate["p_value"] is not None else ""))
        lines += _speed_lines(rec)
    return "\n".join(lines) + "\n"


def delta_plot_svg(records: list[dict], *, width: int = 640, row_height: int = 28) -> str:
    """Each gate's drop as a dot with its interval, scaled to its own allowed drop (the dashed line at 1)."""
    rows = [r for r in gate_rows(records) if r["gate"].get("kind") != "speed"]  # speed gates are ratios, not drops
    if not rows:
        return ""
    left, right, top = 220, 20, 24
    height = top + row_height * len(rows) + 24
    scaled = [(r, [v / (r["gate"]["max_drop"] or 1.0) for v in (r["gate"]["ci_low"], r["gate"]["drop"], r["gate"]["ci_high"])]) for r in rows]
    lo = min(-1.0, *(s[0] for _, s in scaled))
    hi = max(2.0, *(s[2] for _, s in scaled))
    x = lambda v: left + (v - lo) / (hi - lo) * (width - left - right)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">']
    parts.append(f'<line x1="{x(0):.1f}" y1="{top - 10}" x2="{x(0):.1f}" y2="{height - 20}" stroke="#888"/>')
    parts.append(f'<line x1="{x(1):.1f}" y1="{top - 10}" x2="{x(1):.1f}" y2="{height - 20}" stroke="#c00" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x(1):.1f}" y="{height - 6}" text-anchor="middle" fill="#c00">allowed drop</text><text x="{x(0):.1f}" y="{height - 6}" text-anchor="middle">no change</text>')
    colors = {"pass": "#080", "fail": "#c00", "undecided": "#c80"}
    for k, (row, (low, mid, high)) in enumerate(scaled):
        y = top + row_height * k + row_height / 2
        color = colors[row["gate"]["verdict"]]
        label = html.escape(f"{row['index']}: {row['pass']} ({row['metric']})")
        parts.append(f'<text x="4" y="{y + 4:.1f}">{label}</text>')
        parts.append(f'<line x1="{x(low):.1f}" y1="{y:.1f}" x2="{x(high):.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<circle cx="{x(mid):.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(name: str, source_metrics: dict, records: list[dict]) -> str:
    head = "<th>pass</th><th>metric</th><th>baseline</th><th>measured</th><th>drop [CI]</th><th>verdict</th>"
    body = "".join(
        f"<tr><td>{html.escape(r['pass'])}</td><td>{html.escape(r['metric'])}</td><td>{r['gate']['baseline']:.4f}</td>"
        f"<td>{r['gate']['measured']:.4f}</td><td>{html.escape(_delta(r['gate']))}</td><td>{html.escape(_verdict(r['gate']))}</td></tr>"
        for r in gate_rows(records)
    )
    source = "".join(f"<tr><td>{html.escape(m)}</td><td>{res['value']:.4f}</td><td>{res.get('n', '')}</td><td>{html.escape(res.get('backend', ''))}</td></tr>"
                     for m, res in sorted(source_metrics.items()))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head>"
        f"<body><h1>{html.escape(name)}: build report</h1><h2>Source model</h2><table><tr><th>metric</th><th>value</th><th>n</th><th>backend</th></tr>{source}</table>"
        f"<h2>Gates</h2><table><tr>{head}</tr>{body}</table><h2>Drops with confidence intervals (scaled to each gate's allowed drop)</h2>"
        f"{delta_plot_svg(records)}</body></html>\n"
    )


def write_reports(path: Path, name: str, source_metrics: dict, records: list[dict]) -> None:
    path = Path(path)
    (path / REPORT_MD).write_text(markdown(name, source_metrics, records))
    (path / REPORT_HTML).write_text(html_report(name, source_metrics, records))


def write_junit(path: Path, name: str, records: list[dict], failed: tuple[str, dict] | None = None) -> None:
    """JUnit XML: one test case per gate. `failed` is (pass name, gate dict) of a gate that stopped the build."""
    rows = [(r["pass"], r["gate"]) for r in gate_rows(records)]
    if failed is not None:
        rows.append(failed)
    suite = ET.Element("testsuite", name=f"optforge gates: {name}", tests=str(len(rows)), failures=str(sum(not g["passed"] for _, g in rows)))
    for pass_name, gate in rows:
        case = ET.SubElement(suite, "testcase", classname=f"optforge.{name}", name=f"{pass_name} [{gate['metric']}]")
        text = f"{gate['metric']}: baseline {gate['baseline']:.4f}, measured {gate['measured']:.4f}, {'' if gate.get('kind') == 'speed' else 'drop '}{_delta(gate)}: {_verdict(gate)}; {gate['rule']}"
        if not gate["passed"]:
            ET.SubElement(case, "failure", message=_verdict(gate)).text = text
        else:
            ET.SubElement(case, "system-out").text = text
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    Path(path).write_text(ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n")
