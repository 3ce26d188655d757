"""Adapted heads → one self-contained HTML page a reviewer can open and read at a glance.

Per control of the project's latest head: a reliability diagram before/after calibration,
accuracy against corrections per label (zero-shot line included), per-label precision/recall,
and the held-out numbers behind the decision; then the history of heads. Charts are inline
SVG written here: no plotting dependency, no network, opens anywhere.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from ..store import Record

WIDTH, HEIGHT, PAD = 320, 240, 36
BEFORE, AFTER, ZERO = "#9aa0a6", "#1a73e8", "#d93025"


def render(project: str, heads: list[Record], active: str | None) -> str:
    """The report for one project's stored heads (newest decides the charts)."""
    title = f"Project {html.escape(project)}: learning from corrections"
    if not heads:
        body = ("<p>No adapted head yet: the project serves zero-shot. Heads are fitted on "
                "Label Studio's Train button and every ADAPT_EVERY corrections.</p>")
        return _page(title, body)
    latest = heads[-1]
    sections = [f"<p>Serving <b>{html.escape(active or 'zero-shot')}</b>. Latest head "
                f"<b>{html.escape(latest['id'])}</b>, fitted {_when(latest['created_at'])} "
                f"({html.escape(latest['trigger'])}) in {latest['seconds']} s.</p>"]
    for name, control in latest["controls"].items():
        sections.append(_control(name, control))
    sections.append(_history(heads, active))
    return _page(title, "\n".join(sections))


def _control(name: str, control: Record) -> str:
    charts = [_reliability(control.get("reliability", {}))]
    if control.get("learning_curve"):
        charts.append(_curve(control["learning_curve"]))
    numbers = _numbers(control)
    return (f"<h2>Control <code>{html.escape(name)}</code>: {html.escape(control['reason'])}</h2>"
            f"<div class=row>{''.join(charts)}</div>{numbers}{_per_label(control['per_label'])}")


def _numbers(control: Record) -> str:
    rows = []
    for key, label in (("before", "zero-shot, uncalibrated"),
                       ("zero_shot", "zero-shot, calibrated"),
                       ("candidate", "best adapted head"), ("after", "served now")):
        scores = control.get(key) or {}
        cells = "".join(f"<td>{_fmt(scores.get(m))}</td>" for m in ("accuracy", "nll", "ece"))
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    return (f"<p>Held-out numbers on {control['examples']} corrections (each judged by a head "
            "fitted without it):</p><table><tr><th></th><th>accuracy</th><th>NLL</th>"
            f"<th>ECE</th></tr>{''.join(rows)}</table>")


def _per_label(rows: list[Record]) -> str:
    body = "".join(f"<tr><td>{html.escape(str(r['label']))}</td><td>{r['support']}</td>"
                   f"<td>{_fmt(r['precision'])}</td><td>{_fmt(r['recall'])}</td></tr>"
                   for r in rows)
    return ("<details><summary>Per-label precision and recall (current head, held out)"
            "</summary><table><tr><th>label</th><th>corrections</th><th>precision</th>"
            f"<th>recall</th></tr>{body}</table></details>")


def _history(heads: list[Record], active: str | None) -> str:
    rows = []
    for head in reversed(heads):
        methods = ", ".join(f"{n}: {c['adapter']['method']}" for n, c in head["controls"].items())
        mark = " (active)" if head["id"] == active else ""
        rows.append(f"<tr><td>{html.escape(head['id'])}{mark}</td><td>{_when(head['created_at'])}"
                    f"</td><td>{html.escape(head['trigger'])}</td><td>{html.escape(methods)}</td>"
                    "</tr>")
    return ("<h2>Heads</h2><p>Roll back with <code>POST /heads/activate</code> or "
            "<code>python -m backend heads activate</code>.</p><table><tr><th>head</th>"
            f"<th>fitted</th><th>trigger</th><th>methods</th></tr>{''.join(rows)}</table>")


# --- charts ------------------------------------------------------------------------------------
def _reliability(bins: dict[str, list[Record]]) -> str:
    parts = [_axes("confidence", "accuracy"),
             _line([(0, 0), (1, 1)], "#ccc", dashed=True)]
    for key, colour in (("before", BEFORE), ("after", AFTER)):
        points = [(b["confidence"], b["accuracy"]) for b in bins.get(key, [])]
        parts.append(_line(points, colour))
        parts.extend(_dot(x, y, colour) for x, y in points)
    legend = _legend([("before calibration", BEFORE), ("after", AFTER)])
    return _svg("Reliability (held out)", parts + [legend])


def _curve(rows: list[Record]) -> str:
    top = max(r["shots"] for r in rows)
    span = math.log2(top) or 1.0
    adapted = [(math.log2(r["shots"]) / span, r["adapted"]) for r in rows]
    zero = [(math.log2(r["shots"]) / span, r["zero_shot"]) for r in rows]
    parts = [_axes(f"corrections per label, 1 to {top} (log scale)", "accuracy"),
             _line(zero, ZERO, dashed=True), _line(adapted, AFTER)]
    parts.extend(_dot(x, y, AFTER) for x, y in adapted)
    legend = _legend([("adapted", AFTER), ("zero-shot", ZERO)])
    return _svg("Accuracy vs corrections", parts + [legend])


def _xy(x: float, y: float) -> tuple[float, float]:
    return PAD + x * (WIDTH - 2 * PAD), HEIGHT - PAD - y * (HEIGHT - 2 * PAD)


def _axes(x_label: str, y_label: str) -> str:
    x0, y0 = _xy(0, 0)
    x1, y1 = _xy(1, 1)
    return (f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" '
            f'stroke="#888"/><text x="{(x0 + x1) / 2}" y="{HEIGHT - 8}" text-anchor="middle">'
            f'{html.escape(x_label)}</text><text x="10" y="{(y0 + y1) / 2}" '
            f'transform="rotate(-90 10 {(y0 + y1) / 2})" text-anchor="middle">'
            f"{html.escape(y_label)}</text>")


def _line(points: list[tuple[float, float]], colour: str, dashed: bool = False) -> str:
    if len(points) < 2:
        return ""
    coords = " ".join("{:.1f},{:.1f}".format(*_xy(x, y)) for x, y in points)
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'


def _dot(x: float, y: float, colour: str) -> str:
    cx, cy = _xy(x, y)
    return f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>'


def _legend(items: list[tuple[str, str]]) -> str:
    return "".join(f'<text x="{PAD + 6}" y="{PAD + 14 + 14 * i}" fill="{colour}">'
                   f"{html.escape(label)}</text>" for i, (label, colour) in enumerate(items))


def _svg(title: str, parts: list[str]) -> str:
    return (f'<figure><figcaption>{html.escape(title)}</figcaption><svg width="{WIDTH}" '
            f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
            f'aria-label="{html.escape(title)}">{"".join(parts)}</svg></figure>')


def _page(title: str, body: str) -> str:
    style = ("body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;"
             "padding:2px 8px;text-align:right}.row{display:flex;gap:2em;flex-wrap:wrap}"
             "svg text{font-size:11px}figure{margin:0}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{style}</style></head><body><h1>{title}</h1>{body}</body></html>\n")


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stamp))
