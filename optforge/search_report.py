"""The search page of a search's artifact (`search.html`, `search.md`) and its manifest section.

Every candidate in a table (bytes, bits per decoder weight, each gate's change with its interval, speedups,
verdict, items used, seconds), and a plot of the first quality gate's change against weight bytes with each
candidate's interval, the Pareto front (no other candidate is both smaller and better) and the chosen point.
Plain HTML with an inline SVG: no scripts, nothing fetched.
"""

from __future__ import annotations

import html
from pathlib import Path

STATUS_COLORS = {"passed": "#1a7f37", "failed": "#cf222e", "not evaluated": "#8c959f", "not servable": "#9a6700", "error": "#9a6700"}


def _quality_gate(cand: dict) -> dict | None:
    return next((g for g in cand["gates"] if "speedup" not in g), None)


def pareto_front(cands: list[dict]) -> list[int]:
    """Indices (in `cands`) of candidates with bytes and a first-gate change that no other candidate beats on
    both (smaller or equal bytes and a smaller or equal change, one of them strictly)."""
    points = [(i, c["weight_bytes"], _quality_gate(c)["drop"]) for i, c in enumerate(cands) if c["weight_bytes"] and _quality_gate(c)]
    front = []
    for i, b, d in points:
        if not any((b2 <= b and d2 <= d) and (b2 < b or d2 < d) for j, b2, d2 in points if j != i):
            front.append(i)
    return front


def _unit(gate: dict) -> str:
    return "%" if gate["metric"] == "perplexity" else " pts"


def _gate_cell(gate: dict) -> str:
    if "speedup" in gate:
        return f"{gate['speedup']:.2f}x [{gate['speedup_low']:.2f}, {gate['speedup_high']:.2f}] {gate['verdict']}"
    return f"{gate['drop']:+.2f}{_unit(gate)} [{gate['ci_low']:+.2f}, {gate['ci_high']:+.2f}] n={gate['n']} {gate['verdict']}"


def table_rows(cands: list[dict]) -> tuple[list[str], list[list[str]]]:
    metrics = []
    for c in cands:
        for g in c["gates"]:
            if g["metric"] not in metrics:
                metrics.append(g["metric"])
    head = ["#", "candidate", "status", "weight MB", "bits/weight"] + [f"{m} (allowed)" for m in metrics] + ["items", "seconds"]
    rows = []
    for c in cands:
        gates = {g["metric"]: g for g in c["gates"]}
        items = ", ".join(f"{k} {v}/{c['looks']['total_items'].get(k, v)}" for k, v in c["looks"]["items"].items()) if c.get("looks") else ("all" if c["gates"] else "")
        rows.append([str(c["index"]) if c["index"] >= 0 else "", c["label"], c["status"],
                     f"{c['weight_bytes'] / 1e6:.1f}" if c["weight_bytes"] else "", f"{c['bits_per_weight']:.2f}" if c["bits_per_weight"] else "",
                     *[_gate_cell(gates[m]) if m in gates else "" for m in metrics], items, f"{c['seconds']:.0f}"])
    return head, rows


def _svg(cands: list[dict], chosen_label: str) -> str:
    pts = [(c, _quality_gate(c)) for c in cands if c["weight_bytes"] and _quality_gate(c)]
    if not pts:
        return "<p>No candidate has both a size and a quality measurement to plot.</p>"
    w, h, pad, legend_w = 860, 420, 64, 170  # the legend sits right of the plot area
    xs = [c["weight_bytes"] / 1e6 for c, _ in pts]
    ys = [v for _, g in pts for v in (g["ci_low"], g["ci_high"], g["max_drop"])]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys + [0.0]), max(ys)
    y0, y1 = y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1)
    right = w - legend_w  # the plot area's right edge
    sx = lambda x: pad + (x - x0) / (x1 - x0 or 1) * (right - pad)  # noqa: E731
    sy = lambda y: h - pad - (y - y0) / (y1 - y0 or 1) * (h - 2 * pad)  # noqa: E731
    gate = pts[0][1]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{right}" y2="{h - pad}" stroke="black"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{(pad + right) / 2}" y="{h - 20}" text-anchor="middle">weight bytes (MB)</text>',
           f'<text x="18" y="{h / 2}" text-anchor="middle" transform="rotate(-90 18 {h / 2})">{html.escape(gate["metric"])} change ({_unit(gate).strip()}), worse upward</text>',
           f'<line x1="{pad}" y1="{sy(gate["max_drop"]):.1f}" x2="{right}" y2="{sy(gate["max_drop"]):.1f}" stroke="#cf222e" stroke-dasharray="6 4"/>',
           f'<text x="{right}" y="{sy(gate["max_drop"]) - 6:.1f}" text-anchor="end" fill="#cf222e">allowed {gate["max_drop"]:g}{_unit(gate)}</text>']
    for k in range(5):
        xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{h - pad + 16}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{pad - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    front = [cands.index(c) for c in (cands[i] for i in pareto_front(cands))]
    line = sorted((cands[i]["weight_bytes"] / 1e6, _quality_gate(cands[i])["drop"]) for i in front)
    if len(line) > 1:
        out.append('<polyline fill="none" stroke="#0969da" stroke-width="1.5" points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line) + '"/>')
    for c, g in pts:
        x, color = sx(c["weight_bytes"] / 1e6), STATUS_COLORS.get(c["status"], "black")
        out.append(f'<line x1="{x:.1f}" y1="{sy(g["ci_low"]):.1f}" x2="{x:.1f}" y2="{sy(g["ci_high"]):.1f}" stroke="{color}"/>')
        r = 7 if c["label"] == chosen_label else 4
        ring = ' stroke="black" stroke-width="2"' if c["label"] == chosen_label else ""
        out.append(f'<circle cx="{x:.1f}" cy="{sy(g["drop"]):.1f}" r="{r}" fill="{color}"{ring}><title>{html.escape(c["label"])}: {c["status"]}</title></circle>')
        out.append(f'<text x="{x + 8:.1f}" y="{sy(g["drop"]) - 6:.1f}" font-size="10">{c["index"]}</text>')
    legend = [("passed", "passed"), ("failed", "failed"), ("not servable", "not servable / error")]
    lx = right + 24
    for k, (status, text) in enumerate(legend):
        out.append(f'<circle cx="{lx}" cy="{pad + 14 * k}" r="4" fill="{STATUS_COLORS[status]}"/><text x="{lx + 10}" y="{pad + 4 + 14 * k}">{text}</text>')
    out.append(f'<line x1="{lx - 6}" y1="{pad + 42}" x2="{lx + 6}" y2="{pad + 42}" stroke="#0969da"/><text x="{lx + 10}" y="{pad + 46}">Pareto front</text>')
    out.append(f'<circle cx="{lx}" cy="{pad + 58}" r="7" fill="white" stroke="black" stroke-width="2"/><text x="{lx + 10}" y="{pad + 62}">chosen</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_html(name: str, cands: list[dict], chosen: dict, why: str) -> str:
    head, rows = table_rows(cands)
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>\n"
    for row, c in zip(rows, cands):
        style = ' style="font-weight:bold"' if c["label"] == chosen["label"] else ""
        table += f"<tr{style}>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>\n"
    table += "</table>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(name)}: search</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #d0d7de;padding:4px 8px;text-align:left}}
th{{background:#f6f8fa}}</style></head><body>
<h1>{html.escape(name)}: search</h1>
<p>Chosen: <b>{html.escape(chosen['label'])}</b> &mdash; {html.escape(why)}.</p>
{_svg(cands, chosen['label'])}
<p>Each point is a candidate at its weight bytes; the bar is the interval of its change on the first quality gate's metric
(at the confidence of the look that decided it). Candidates that were not built or not judged have no point.</p>
{table}
</body></html>
"""


def render_md(name: str, cands: list[dict], chosen: dict, why: str) -> str:
    head, rows = table_rows(cands)
    lines = [f"# {name}: search", "", f"Chosen: **{chosen['label']}** ({why}).", "", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def search_extra(recipe, cands: list[dict], chosen: dict, why: str, *, source_bytes: int):
    """`write_extra` for pipeline.publish: writes search.html and search.md, returns the manifest's `search` section."""

    def write(folder: Path) -> dict:
        (folder / "search.html").write_text(render_html(recipe.name, cands, chosen, why), encoding="utf-8")
        (folder / "search.md").write_text(render_md(recipe.name, cands, chosen, why), encoding="utf-8")
        return {"search": {"objective": recipe.search.objective, "source_weight_bytes": source_bytes, "chosen": chosen["label"], "why": why,
                           "candidates": cands}}

    return write
