"""An authority's record (requests answered, reports fixed) as a small inline SVG bar chart:
no JavaScript, no external file.

Inline so the page stays one request and works offline and in print; plain markup so it
passes the page's Content Security Policy (no inline `style`: colours come from classes in
style.css, with presentation-attribute fallbacks). It has a `<title>` and `<desc>` for screen
readers, and the page states the same figures in words beside it.
"""
from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

from mailflow.archive.context import Record

KEYS = ("on_time", "late", "very_late", "no_answer")
REPORT_KEYS = ("fixed", "open", "other")
_FALLBACK = {"on_time": "#2e7d32", "late": "#b26a00", "very_late": "#b3261e",
             "no_answer": "#5f6368", "fixed": "#2e7d32", "open": "#b3261e", "other": "#5f6368"}
_W, _LABEL_W, _ROW_H, _BAR_H = 320, 110, 26, 18


def bar_chart(rows: list[tuple[str, str, int]], *, title: str, desc: str,
              chart_id: str) -> Markup:
    """Horizontal bars, one per (key, label, count) row, each labelled with its count; the
    key picks the bar's colour class (`bar-<key>`)."""
    top = max(sum(n for _, _, n in rows), 1)
    height = _ROW_H * len(rows) + 4
    out = []
    for i, (key, label, n) in enumerate(rows):
        y = 2 + i * _ROW_H
        width = round((_W - _LABEL_W - 40) * n / top)
        out.append(
            f'<g class="bar bar-{key}">'
            f'<text x="0" y="{y + 13}" class="bar-label">{escape(label)}</text>'
            f'<rect x="{_LABEL_W}" y="{y}" width="{max(width, 1)}" height="{_BAR_H}" '
            f'fill="{_FALLBACK[key]}"><title>{escape(label)}: {n}</title></rect>'
            f'<text x="{_LABEL_W + max(width, 1) + 6}" y="{y + 13}" class="bar-value">{n}</text>'
            "</g>")
    cid = escape(chart_id)
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" '
        f'aria-labelledby="{cid}-title {cid}-desc">'
        f'<title id="{cid}-title">{escape(title)}</title><desc id="{cid}-desc">{escape(desc)}</desc>'
        + "".join(out) + "</svg>")


def record_chart(record: Record, *, labels: list[str], title: str, desc: str,
                 chart_id: str = "record") -> Markup:
    """Four horizontal bars, one per outcome (`labels`, in KEYS order, translated by the
    template), each labelled with its count."""
    return bar_chart([(key, label, getattr(record, key))
                      for key, label in zip(KEYS, labels, strict=True)],
                     title=title, desc=desc, chart_id=chart_id)


def report_chart(record: Any, *, labels: list[str], title: str, desc: str,
                 chart_id: str = "report-record") -> Markup:
    """An authority's fault reports: fixed, still open, and closed without a fix (`labels`
    in REPORT_KEYS order); the last bar only when there are any."""
    rows = [(key, label, getattr(record, key))
            for key, label in zip(REPORT_KEYS, labels, strict=True)]
    return bar_chart([r for r in rows if r[0] != "other" or r[2]], title=title, desc=desc,
                     chart_id=chart_id)
