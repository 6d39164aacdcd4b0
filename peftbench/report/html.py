"""``report.html``: the report as one self-contained page that opens offline from disk.

Beside ``report.md`` the report command writes one HTML file with no outside reference (no
server, no network): plotly.js inlined, every plot a data URI. It holds

- the records table (one row per record, as ``records.csv``): sortable by any column (click its
  heading), filtered by method, model, task, device and lever and by free text, and saved as
  CSV from the page (the rows the filters leave);
- a Pareto view over any two numeric figures chosen in the page (plotly): the runs the filters
  leave, those that differ only in seed pooled into one point with an error bar of their
  standard deviation (``points``), one colour per method, and the Pareto front where both
  figures have a direction (``DIRECTION``);
- the Markdown report itself, rendered (``markdown``), with its tables and PNG plots.

The page's data is JSON inside the page (``</`` escaped); its code is the short script in
``SCRIPT``.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import markdown
import pandas as pd
from plotly.offline import get_plotlyjs

from peftbench.compare import quality_direction
from peftbench.records import reader as records
from peftbench.report.aggregate import lever_name

# the columns the table shows first (every other column of records.csv follows, hidden until
# chosen in the page's column list)
SHOWN = (
    "label", "method", "model", "task", "device", "lever", "seed", "status", "quality_metric", "quality",
    "trainable_params", "peak_bytes", "train_step_ms_median", "train_tokens_per_s", "inference_latency_ms",
    "checkpoint_bytes", "forgetting_kl", "eval_set", "run_id",
)  # fmt: skip
FILTERS = ("method", "model", "task", "device", "lever")
# columns whose lower value is better, by name (a cost): memory, time, size, FLOPs, parameters
LOWER = re.compile(r"(bytes|_ms|_ms_median|ms_per_token|_s$|flops|params$|_iqr)")
# columns whose higher value is better, by name: throughput and utilisation
HIGHER = re.compile(r"(per_s|mfu)")


def direction(col: str) -> Optional[str]:
    """Which way a column is better ("higher", "lower") for the Pareto front, or None: a
    quality metric by ``compare.quality_direction``, a throughput higher, a cost lower."""
    if col == "quality":
        return None  # mixed metrics; the page takes the direction of the rows' quality_metric
    found = quality_direction(col)
    if found:
        return found
    if HIGHER.search(col):
        return "higher"
    if LOWER.search(col):
        return "lower"
    return None


def metric_direction(shown: str) -> Optional[str]:
    """The direction of a ``quality_metric`` cell (``eval_loss (lower is better)``)."""
    return quality_direction(str(shown).split(" ", 1)[0])


def plain(v: Any) -> Any:
    """A JSON value for one cell: NaN and infinities as null, numpy scalars as Python's."""
    if v is None:
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def with_columns(df: pd.DataFrame, recs: list[dict[str, Any]]) -> pd.DataFrame:
    """``df`` with the columns the page filters and pools by: ``lever`` (``aggregate.lever_name``
    of the record's config), ``seed`` and ``group`` (the runs that differ only in seed share it)."""
    by_id = {r["run_id"]: r for r in recs}
    cfg = df["run_id"].map(lambda i: records.flat(by_id[i].get("config") or {}) if i in by_id else {})
    out = df.assign(
        lever=cfg.map(lever_name),
        seed=df["run_id"].map(lambda i: plain(records.run_seed(by_id[i])) if i in by_id else None),
        group=df["run_id"].map(lambda i: repr(records.seed_free_key(by_id[i])) if i in by_id else i),
    )
    return out


def table(df: pd.DataFrame) -> dict[str, Any]:
    """The records table for the page: its columns (shown first, then the rest), the numeric
    ones with their direction, and the rows as lists."""
    cols = [c for c in SHOWN if c in df] + sorted(c for c in df if c not in SHOWN and c != "group")
    numeric = [
        c
        for c in cols
        if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) and df[c].notna().any()
    ]
    return {
        "columns": cols,
        "shown": [c for c in SHOWN if c in df],
        "numeric": numeric,
        "direction": {c: direction(c) for c in numeric},
        "quality_direction": {m: metric_direction(m) for m in df.get("quality_metric", pd.Series()).dropna().unique()},
        "filters": [c for c in FILTERS if c in df],
        "rows": [[plain(v) for v in r] for r in df[cols].itertuples(index=False)],
        "group": [str(g) for g in df["group"]],
    }


def inline_images(html: str, out: Path) -> str:
    """``html`` with every ``<img src="NAME.png">`` of a file in ``out`` as a data URI."""

    def data_uri(m: re.Match[str]) -> str:
        path = out / m.group(2)
        if not path.is_file():
            return m.group(0)
        return f'{m.group(1)}"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    return re.sub(r'(<img[^>]*?src=)"([^"/:]+\.png)"', data_uri, html)


def script_json(data: Any) -> str:
    """JSON to sit inside a ``<script>`` element: ``</`` cannot end it early."""
    return json.dumps(data, allow_nan=False).replace("</", "<\\/")


def page(df: pd.DataFrame, recs: list[dict[str, Any]], report_md: str, out: Path) -> str:
    """The whole ``report.html`` for the rows ``df`` of the records ``recs``, with the Markdown
    report ``report_md`` (its plots read from ``out``) rendered below the interactive part."""
    data = table(with_columns(df, recs)) if not df.empty else {"columns": [], "rows": []}
    body = inline_images(markdown.markdown(report_md, extensions=["tables", "fenced_code"]), out)
    return TEMPLATE.format(
        plotly=get_plotlyjs(),
        data=script_json(data),
        script=SCRIPT,
        style=STYLE,
        report=body,
        n=len(df),
    )


STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f3f3f3; cursor: pointer; position: sticky; top: 0; }
#records-wrap { max-height: 28em; overflow: auto; border: 1px solid #ccc; }
.controls { margin: .5em 0; display: flex; flex-wrap: wrap; gap: .8em; align-items: center; }
#columns { max-height: 8em; overflow: auto; border: 1px solid #ddd; padding: .3em; columns: 4; font-size: 12px; }
#report img { max-width: 100%; }
"""

TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>peftbench report</title>
<style>{style}</style>
<script>{plotly}</script>
</head><body>
<h1>peftbench report (interactive)</h1>
<p>{n} records. Everything here opens offline: the data and plotly.js are inside this file.
The table and the Pareto view follow the filters.</p>
<h2>Records</h2>
<div class="controls" id="filters"></div>
<div class="controls"><label>text <input id="search" size="30" placeholder="filter any cell"></label>
<span id="count"></span> <button id="csv">Save these rows as CSV</button>
<details><summary>columns</summary><div id="columns"></div></details></div>
<div id="records-wrap"><table id="records"><thead></thead><tbody></tbody></table></div>
<h2>Pareto view</h2>
<div class="controls"><label>x <select id="x"></select></label><label>y <select id="y"></select></label>
<span>runs that differ only in seed are one point, with a bar of &plusmn; one standard deviation over them</span></div>
<div id="pareto" style="height: 480px"></div>
<h2>The report</h2>
<div id="report">{report}</div>
<script type="application/json" id="data">{data}</script>
<script>{script}</script>
</body></html>
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const C = D.columns || [], idx = Object.fromEntries(C.map((c, i) => [c, i]));
let shown = new Set(D.shown || C), sortCol = null, sortDir = 1;
const filters = {};
function fmt(v) {
  if (v === null || v === undefined) return '';
  if (typeof v === 'number') return Number.isInteger(v) ? v.toLocaleString('en') : v.toPrecision(4);
  return String(v);
}
function visible() {
  const q = document.getElementById('search').value.toLowerCase();
  return D.rows.map((r, i) => i).filter(i => {
    const r = D.rows[i];
    for (const [c, v] of Object.entries(filters)) if (v !== '' && String(r[idx[c]]) !== v) return false;
    return !q || r.some(v => v !== null && String(v).toLowerCase().includes(q));
  });
}
function drawTable() {
  const cols = C.filter(c => shown.has(c));
  document.querySelector('#records thead').innerHTML = '<tr>' + cols.map(c =>
    `<th data-col="${c}">${c}${c === sortCol ? (sortDir > 0 ? ' \u25b2' : ' \u25bc') : ''}</th>`).join('') + '</tr>';
  let rows = visible();
  if (sortCol !== null) {
    const k = idx[sortCol];
    rows.sort((a, b) => {
      const x = D.rows[a][k], y = D.rows[b][k];
      if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
  }
  const tb = document.querySelector('#records tbody');
  const cells = i => cols.map(c => `<td>${fmt(D.rows[i][idx[c]])}</td>`).join('');
  tb.innerHTML = rows.map(i => '<tr>' + cells(i) + '</tr>').join('');
  document.getElementById('count').textContent = `${rows.length} of ${D.rows.length} rows`;
  document.querySelectorAll('#records th').forEach(th => th.onclick = () => {
    const c = th.dataset.col; sortDir = sortCol === c ? -sortDir : 1; sortCol = c; drawTable();
  });
  drawPareto(rows);
}
function mean(a) { return a.reduce((s, v) => s + v, 0) / a.length; }
function std(a) {
  if (a.length < 2) return 0;
  const m = mean(a);
  return Math.sqrt(a.reduce((s, v) => s + (v - m) ** 2, 0) / (a.length - 1));
}
function better(col, rows) {
  if (col !== 'quality') return D.direction[col] || null;
  const ds = new Set(rows.map(i => D.quality_direction[D.rows[i][idx.quality_metric]]));
  return ds.size === 1 ? [...ds][0] : null;
}
function drawPareto(rows) {
  const xc = document.getElementById('x').value, yc = document.getElementById('y').value;
  if (!xc || !yc) return;
  const groups = {};
  for (const i of rows) {
    const r = D.rows[i], x = r[idx[xc]], y = r[idx[yc]];
    if (typeof x !== 'number' || typeof y !== 'number' || r[idx.status] !== 'ok') continue;
    (groups[D.group[i]] = groups[D.group[i]] || {method: r[idx.method], label: r[idx.label], xs: [], ys: []});
    groups[D.group[i]].xs.push(x); groups[D.group[i]].ys.push(y);
  }
  const pts = Object.values(groups).map(g => ({method: g.method, label: g.label, n: g.xs.length,
    x: mean(g.xs), y: mean(g.ys), ex: std(g.xs), ey: std(g.ys)}));
  const byMethod = {};
  for (const p of pts) (byMethod[p.method] = byMethod[p.method] || []).push(p);
  const traces = Object.entries(byMethod).map(([m, ps]) => ({
    type: 'scatter', mode: 'markers', name: m, x: ps.map(p => p.x), y: ps.map(p => p.y),
    text: ps.map(p => `${p.label} (n=${p.n})`), hovertemplate: '%{text}<br>x %{x}<br>y %{y}<extra></extra>',
    error_x: {type: 'data', array: ps.map(p => p.ex), visible: ps.some(p => p.ex > 0)},
    error_y: {type: 'data', array: ps.map(p => p.ey), visible: ps.some(p => p.ey > 0)},
    marker: {size: 9}}));
  const dx = better(xc, rows), dy = better(yc, rows);
  if (dx && dy && pts.length > 1) {
    const sx = dx === 'higher' ? -1 : 1, sy = dy === 'higher' ? -1 : 1;
    const front = pts.filter(p => !pts.some(q => q !== p && sx * q.x <= sx * p.x && sy * q.y <= sy * p.y &&
      (sx * q.x < sx * p.x || sy * q.y < sy * p.y))).sort((a, b) => a.x - b.x);
    traces.push({type: 'scatter', mode: 'lines', name: 'Pareto front', x: front.map(p => p.x),
      y: front.map(p => p.y), line: {color: 'red', dash: 'dot'}, hoverinfo: 'skip'});
  }
  Plotly.react('pareto', traces, {margin: {t: 20}, xaxis: {title: {text: xc}}, yaxis: {title: {text: yc}},
    legend: {orientation: 'h'}}, {displaylogo: false});
}
function csv(rows) {
  const q = v => {
    const s = v === null ? '' : String(v);
    return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  };
  return [C.map(q).join(','), ...rows.map(i => D.rows[i].map(q).join(','))].join('\n') + '\n';
}
function setup() {
  const f = document.getElementById('filters');
  for (const c of D.filters || []) {
    const values = [...new Set(D.rows.map(r => r[idx[c]]).filter(v => v !== null).map(String))].sort();
    const s = document.createElement('select'); s.id = 'filter-' + c;
    s.innerHTML = `<option value="">every ${c}</option>` + values.map(v => `<option>${v}</option>`).join('');
    s.onchange = () => { filters[c] = s.value; drawTable(); };
    const l = document.createElement('label'); l.append(c + ' ', s); f.append(l);
  }
  document.getElementById('columns').innerHTML = C.map(c =>
    `<label><input type="checkbox" data-col="${c}" ${shown.has(c) ? 'checked' : ''}> ${c}</label><br>`).join('');
  document.querySelectorAll('#columns input').forEach(b => b.onchange = () => {
    b.checked ? shown.add(b.dataset.col) : shown.delete(b.dataset.col); drawTable(); });
  for (const [id, pick] of [['x', 'peak_bytes'], ['y', 'quality']]) {
    const s = document.getElementById(id);
    s.innerHTML = (D.numeric || []).map(c => `<option ${c === pick ? 'selected' : ''}>${c}</option>`).join('');
    s.onchange = () => drawTable();
  }
  document.getElementById('search').oninput = () => drawTable();
  document.getElementById('csv').onclick = () => {
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([csv(visible())], {type: 'text/csv'}));
    a.download = 'records-filtered.csv'; a.click();
  };
  drawTable();
}
setup();
"""
