"""The sweep's report page: one self-contained HTML file (figures embedded) readable offline."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.tables import UNITS, is_missing

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.0em; margin: 0.3em 0; }
table { border-collapse: collapse; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.text { text-align: left; white-space: normal; max-width: 28em; }
tr.best td { background: #eef7ee; font-weight: 600; }
tr.failed td, tr.stopped td { color: #a00; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; } .notes li { color: #a00; } .meta { color: #666; font-size: 0.9em; }
"""

CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-decoded", ok + "/" + imgs.length);
  var el = document.getElementById("image-check");
  if (el) { el.textContent = ok + " of " + imgs.length + " figures rendered"; }
});
"""


@dataclass
class FigureEntry:
    """A figure on the page: its PNG (embedded), PDF (linked) and caption."""

    name: str
    title: str
    caption: str
    png: Path

    @property
    def pdf(self) -> Path:
        return self.png.with_suffix(".pdf")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def cell(value, column: str) -> str:
    if column == "best":
        return "<td>★</td>" if value else "<td></td>"
    if is_missing(value) or value == "":
        return "<td>—</td>"
    if isinstance(value, float):
        return f"<td>{value:.4g}</td>"
    if column == "error":
        return f'<td class="text">{html.escape(str(value))}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def html_table(df: pd.DataFrame, table_id: str) -> str:
    """An HTML table with the best row highlighted and failed/stopped rows marked."""
    head = "".join(f'<th title="{html.escape(UNITS.get(c, c))}">{html.escape(str(c))}</th>' for c in df.columns)
    rows = []
    for record in df.to_dict("records"):
        classes = []
        if record.get("best"):
            classes.append("best")
        if record.get("status") in ("failed", "stopped"):
            classes.append(str(record["status"]))
        cells = "".join(cell(record[c], c) for c in df.columns)
        rows.append(f'<tr class="{" ".join(classes)}">{cells}</tr>')
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def write_report(out: Path, title: str, source: str, table: pd.DataFrame, figures: list[FigureEntry],
                 notes: list[str], extra_tables: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write out/report.html showing the table, every figure (embedded PNG, linked PDF) and the notes."""
    units = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in UNITS.items()
                    if k in table.columns)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">results: <code>{html.escape(source)}</code> · built {time.strftime("%Y-%m-%d %H:%M:%S")}'
        f' · <span id="image-check">figures not checked</span></p>',
    ]
    if notes:
        parts.append("<h2>Missing pieces</h2><ul class=\"notes\">")
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts.append("<h2>Comparison table</h2>")
    parts.append(html_table(table, "comparison"))
    parts.append(f'<ul class="meta">{units}<li>★ best trial (lowest final held-out negative ELBO)</li>'
                 '<li>also as <a href="table.csv">table.csv</a> and <a href="table.md">table.md</a></li></ul>')
    for name, extra in (extra_tables or {}).items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(html_table(extra, name.replace(" ", "-")))
    parts.append("<h2>Figures</h2>")
    for fig in figures:
        parts.append(
            f'<figure id="fig-{fig.name}"><h3>{html.escape(fig.title)}</h3>'
            f'<img src="{data_uri(fig.png)}" alt="{html.escape(fig.title)}" data-figure="{fig.name}">'
            f"<figcaption>{html.escape(fig.caption)} "
            f'(<a href="{fig.png.name}">PNG</a>, <a href="{fig.pdf.name}">PDF</a>)</figcaption></figure>'
        )
    parts.append(f"<script>{CHECK_SCRIPT}</script></body></html>")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
