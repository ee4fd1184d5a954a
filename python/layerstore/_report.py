"""``layerstore analyze --html FILE``: one self-contained page (no network at view time).

The page embeds the analysis as JSON and draws, with plain JavaScript and SVG: the summary
figures, a bar per layer (added / modified / deleted / wasted bytes), a treemap of the image by
directory coloured by the layer that provides each file, the waste table with its reasons, and a
file tree whose entries show their layer history (``provenance``). Every number shown is read from
the embedded JSON, so the page and ``--json`` cannot disagree.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

__all__ = ["render_html", "write_html"]

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 20px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 6px; color: #fff; }
#treemap { border: 1px solid #888; }
#tree ul { list-style: none; padding-left: 16px; margin: 0; }
#tree .file { cursor: pointer; } #tree .file:hover { text-decoration: underline; }
#history { background: #f4f4f4; padding: 6px; min-height: 20px; white-space: pre-wrap; }
"""

_SCRIPT = r"""
"use strict";
const A = JSON.parse(document.getElementById("analysis").textContent);
const fmt = n => n.toLocaleString("en-US");
const human = n => { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i]; };
const colour = k => `hsl(${(k * 137.508) % 360}, 60%, 45%)`;
const el = (tag, attrs, ...kids) => { const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of kids) e.append(c); return e; };
const SVG = "http://www.w3.org/2000/svg";
const svgEl = (tag, attrs) => { const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; };

// Summary: each figure carries its JSON key, so a test can compare it with --json.
const im = A.image;
const summary = document.getElementById("summary");
for (const [key, label] of [["layers", "layers"], ["shippedBytes", "bytes shipped in files"],
    ["liveBytes", "bytes seen"], ["liveFiles", "files seen"],
    ["wastedBytes", "bytes wasted (ours)"],
    ["inefficientBytes", "bytes wasted (dive)"], ["sizeBytes", "dive size"]]) {
  summary.append(el("tr", {}, el("td", {}, label),
    el("td", {class: "n", "data-key": "image." + key}, fmt(im[key])),
    el("td", {}, /Bytes$|^sizeBytes$/.test(key) ? human(im[key]) : "")));
}
summary.append(el("tr", {}, el("td", {}, "efficiency (ours)"),
  el("td", {class: "n", "data-key": "image.efficiency"}, im.efficiency.toFixed(6)), el("td", {})));
summary.append(el("tr", {}, el("td", {}, "efficiency (dive)"),
  el("td", {class: "n", "data-key": "image.efficiencyScore"}, im.efficiencyScore.toFixed(6)),
  el("td", {})));

// One bar per layer: added, modified, deleted, wasted bytes.
const parts = [["bytesAdded", "#2a9d3f"], ["bytesModified", "#d4a017"], ["bytesDeleted", "#c0392b"],
  ["wastedBytes", "#7f3fbf"]];
const legend = document.getElementById("legend");
for (const [key, c] of parts) legend.append(el("span", {style: `background:${c}`}, key));
const most = Math.max(1, ...A.layer.map(l => Math.max(...parts.map(([k]) => l[k]))));
const bars = document.getElementById("bars");
const rowH = 4 * 9 + 10, W = 700;
bars.setAttribute("height", A.layer.length * rowH + 10);
A.layer.forEach((l, i) => {
  const y0 = 5 + i * rowH;
  const label = svgEl("text", {x: 0, y: y0 + 20, "font-size": 12});
  label.textContent = `#${l.index}`; bars.append(label);
  parts.forEach(([key, c], j) => {
    const w = Math.max(l[key] ? 1 : 0, (W - 60) * l[key] / most);
    const r = svgEl("rect", {x: 40, y: y0 + j * 9, width: w, height: 8, fill: c,
      "data-layer": l.index, "data-key": key, "data-value": l[key]});
    const t = svgEl("title", {}); t.textContent = `layer ${l.index} ${key}: ${fmt(l[key])}`;
    r.append(t); bars.append(r);
  });
});
const layers = document.getElementById("layers");
for (const l of A.layer) {
  layers.append(el("tr", {}, el("td", {class: "n"}, String(l.index)),
    el("td", {class: "n", "data-key": `layer.${l.index}.tarBytes`}, fmt(l.tarBytes)),
    el("td", {class: "n"}, l.compressedBytes == null ? "" : fmt(l.compressedBytes)),
    el("td", {class: "n"}, fmt(l.filesAdded)), el("td", {class: "n"}, fmt(l.filesModified)),
    el("td", {class: "n"}, fmt(l.filesDeleted)), el("td", {class: "n"}, fmt(l.metadataOnly)),
    el("td", {class: "n", "data-key": `layer.${l.index}.wastedBytes`}, fmt(l.wastedBytes)),
    el("td", {class: "n", "data-key": `layer.${l.index}.causedWasteBytes`},
      fmt(l.causedWasteBytes)),
    el("td", {}, l.command || "")));
}

// Waste: totals by kind, then the largest items with their reasons.
const totals = document.getElementById("waste-totals");
for (const [kind, t] of Object.entries(A.waste.totals)) {
  totals.append(el("tr", {}, el("td", {}, kind), el("td", {class: "n"}, fmt(t.count)),
    el("td", {class: "n", "data-key": `waste.totals.${kind}.bytes`}, fmt(t.bytes))));
}
const items = document.getElementById("waste-items");
for (const it of A.waste.items.slice(0, 500)) {
  items.append(el("tr", {}, el("td", {}, it.kind), el("td", {}, it.path),
    el("td", {}, it.layers.join(" → ")), el("td", {class: "n"}, fmt(it.bytes)),
    el("td", {}, it.reason)));
}
document.getElementById("waste-more").textContent = A.waste.items.length > 500 ?
  `(${fmt(A.waste.items.length - 500)} smaller items are in the JSON)` : "";

// The directory tree of the files the image shows.
const root = {name: "/", size: 0, kids: new Map(), file: null};
for (const f of A.files || []) {
  let node = root; node.size += f.size;
  const parts = f.path.split("/").filter(Boolean);
  parts.forEach((p, i) => {
    if (!node.kids.has(p)) node.kids.set(p, {name: p, size: 0, kids: new Map(), file: null});
    node = node.kids.get(p); node.size += f.size;
    if (i === parts.length - 1) node.file = f;
  });
}

// Treemap: slice and dice by directory, files coloured by the layer that provides them.
const tm = document.getElementById("treemap");
const TW = 900, TH = 420;
let drawn = 0;
function treemap(node, x, y, w, h, depth) {
  if (drawn > 20000 || w < 1 || h < 1) return;
  if (node.file) {
    drawn++;
    const r = svgEl("rect", {x, y, width: w, height: h, fill: colour(node.file.layer),
      stroke: "#fff", "stroke-width": 0.3});
    const t = svgEl("title", {});
    t.textContent = `${node.file.path} (${fmt(node.file.size)} B, layer ${node.file.layer})`;
    r.append(t); tm.append(r); return;
  }
  const kids = [...node.kids.values()].filter(k => k.size > 0).sort((a, b) => b.size - a.size);
  let at = 0;
  for (const k of kids) {
    const share = k.size / node.size;
    if (depth % 2 === 0) { treemap(k, x + at * w, y, share * w, h, depth + 1); }
    else { treemap(k, x, y + at * h, w, share * h, depth + 1); }
    at += share;
  }
}
if (root.size > 0) treemap(root, 0, 0, TW, TH, 0);
const tmLegend = document.getElementById("treemap-legend");
for (const l of A.layer) {
  tmLegend.append(el("span", {style: `background:${colour(l.index)}`}, `layer ${l.index}`));
}

// File tree: click a file to see its layer history.
const hist = document.getElementById("history");
function showHistory(f) {
  hist.textContent = f.path + "\n" + f.history.map(({layer: k, touch}) =>
    `layer ${k}: ${touch}` + (A.layer[k] && A.layer[k].command ? `  (${A.layer[k].command})` : "")
  ).join("\n");
}
function tree(node, depth) {
  const ul = el("ul", {});
  const kids = [...node.kids.values()].sort((a, b) => a.name < b.name ? -1 : 1);
  for (const k of kids) {
    if (k.file) {
      const li = el("li", {class: "file"}, `${k.name}  (${human(k.size)}, layer ${k.file.layer})`);
      li.addEventListener("click", () => showHistory(k.file));
      ul.append(li);
    } else {
      const d = el("details", {}, el("summary", {}, `${k.name}/  (${human(k.size)})`));
      let filled = false;
      d.addEventListener("toggle", () => {
        if (!filled) { d.append(tree(k, depth + 1)); filled = true; }
      });
      ul.append(el("li", {}, d));
    }
  }
  return ul;
}
document.getElementById("tree").append(tree(root, 0));
document.body.dataset.rendered = "yes";
"""


def render_html(analysis: Any, *, title: str = "image") -> str:
    """The report page for ``analysis`` (from ``store.analyze(image, files=True)``)."""
    data = json.dumps(analysis, separators=(",", ":")).replace("</", "<\\/")
    t = html.escape(title)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>layerstore analysis: {t}</title>
<style>{_STYLE}</style></head>
<body>
<h1>layerstore analysis: {t}</h1>
<table id="summary"></table>
<h2>Layers</h2>
<div class="legend" id="legend"></div>
<svg id="bars" width="720" height="10" role="img" aria-label="bytes per layer"></svg>
<table><thead><tr><th>#</th><th>tar bytes</th><th>compressed</th><th>added</th><th>modified</th>
<th>deleted</th><th>metadata-only</th><th>wasted bytes</th><th>waste caused</th>
<th>created by</th></tr></thead>
<tbody id="layers"></tbody></table>
<h2>Treemap (by directory, coloured by the providing layer)</h2>
<div class="legend" id="treemap-legend"></div>
<svg id="treemap" width="900" height="420" role="img" aria-label="treemap"></svg>
<h2>Waste</h2>
<table><thead><tr><th>kind</th><th>items</th><th>bytes</th></tr></thead>
<tbody id="waste-totals"></tbody></table>
<table><thead><tr><th>kind</th><th>path</th><th>layers</th><th>bytes</th><th>why</th></tr></thead>
<tbody id="waste-items"></tbody></table>
<p id="waste-more"></p>
<h2>Files (click one for its layer history)</h2>
<div id="history"></div>
<div id="tree"></div>
<script type="application/json" id="analysis">{data}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_html(analysis: Any, dest: str | Path, *, title: str = "image") -> None:
    """Write :func:`render_html`'s page to ``dest``."""
    Path(dest).write_text(render_html(analysis, title=title), encoding="utf-8")
