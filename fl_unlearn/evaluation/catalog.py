"""The shared case-based catalog: anonymous synthetic cases as image files, an index, embeddings, a viewer.

The viewer is one static HTML file that opens from disk (no server): browse the cases by class, or
pick a case to see its nearest catalog cases (cosine similarity of the stored embeddings), the
case-based explanation the catalog is for. ``viewer.html?query=<i>`` opens with case i queried.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fl_unlearn.data.inspect import save_png
from fl_unlearn.errors import DataError
from fl_unlearn.io import write_text_atomic

VIEWER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fl-unlearn catalog</title>
<style>
body{font-family:sans-serif;margin:1em;background:#fafafa}
img{width:96px;height:96px;image-rendering:pixelated;margin:2px;border:2px solid transparent;cursor:pointer}
img.query{border-color:#c00} .case{display:inline-block;text-align:center;font-size:11px}
h2{margin:.6em 0 .2em} #neighbours .case{background:#fff}
</style></head><body>
<h1>Synthetic case catalog</h1>
<p id="summary"></p>
<div><label>class <select id="cls"><option value="all">all</option><option value="0">no cardiomegaly</option>
<option value="1">cardiomegaly</option></select></label></div>
<h2>Nearest cases to the selected case</h2><div id="neighbours"><em>click a case</em></div>
<h2>Cases</h2><div id="grid"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById('data').textContent);
const cases = data.cases, emb = data.embeddings, K = data.neighbours;
function norm(v){const n=Math.sqrt(v.reduce((s,x)=>s+x*x,0))||1;return v.map(x=>x/n);}
const unit = emb.map(norm);
function tile(i, extra){
  const c = cases[i], d = document.createElement('div'); d.className='case';
  const im = document.createElement('img'); im.src = c.file; im.alt = 'case ' + c.id; im.dataset.id = i;
  im.title = `case ${c.id} | label ${c.label} | seed ${c.seed} | max re-id score ${c.max_score.toFixed(3)}`;
  im.onclick = () => query(i);
  d.appendChild(im); d.appendChild(document.createElement('br'));
  d.appendChild(document.createTextNode(extra === undefined ? `#${c.id} (${c.label})` : extra));
  return d;
}
function query(i){
  const q = unit[i];
  const sims = unit.map((v, j) => [j === i ? -Infinity : v.reduce((s, x, k) => s + x * q[k], 0), j]);
  sims.sort((a, b) => b[0] - a[0]);
  const box = document.getElementById('neighbours'); box.innerHTML = '';
  box.appendChild(tile(i, 'query #' + cases[i].id)); box.firstChild.firstChild.classList.add('query');
  sims.slice(0, K).forEach(([s, j]) => box.appendChild(tile(j, `#${cases[j].id} sim ${s.toFixed(3)}`)));
}
function render(){
  const want = document.getElementById('cls').value, grid = document.getElementById('grid'); grid.innerHTML='';
  cases.forEach((c, i) => { if (want === 'all' || String(c.label) === want) grid.appendChild(tile(i)); });
}
document.getElementById('cls').onchange = render;
document.getElementById('summary').textContent =
  `${cases.length} cases from method "${data.method}" (${data.removed} still-flagged images removed); ` +
  `embeddings: ${data.embedding_name}.`;
render();
const q = new URLSearchParams(location.search).get('query');
if (q !== null && cases[Number(q)]) query(Number(q));
</script></body></html>
"""


def build_catalog(folder: str | Path, images: np.ndarray, index: pd.DataFrame, max_scores: np.ndarray,
                  flagged: np.ndarray, embeddings: np.ndarray, *, method: str, embedding_name: str,
                  neighbours: int = 8) -> dict:
    """Write the anonymous part of a synthetic set as a catalog folder; returns its summary.

    ``index`` has one row per image (columns ``label``, ``seed``); ``max_scores`` is the highest
    re-identification score over hospitals, ``flagged`` whether any hospital flagged the image.
    The folder is built beside its final name and renamed, so a failure leaves no half catalog.
    """
    n = len(images)
    if not (len(index) == len(max_scores) == len(flagged) == len(embeddings) == n):
        raise DataError(f"catalog inputs disagree in length: {n} images, {len(index)} index rows, "
                        f"{len(max_scores)} scores, {len(flagged)} flags, {len(embeddings)} embeddings")
    keep = np.flatnonzero(~np.asarray(flagged, dtype=bool))  # may be empty: then the catalog says so
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "images").mkdir(parents=True)
    rows = []
    for i in keep:
        name = f"images/case-{i:05d}.png"
        save_png(images[i], staging / name)
        rows.append({"id": int(i), "file": name, "label": int(index["label"].iloc[i]),
                     "seed": int(index["seed"].iloc[i]), "method": method, "max_score": float(max_scores[i])})
    table = pd.DataFrame(rows, columns=["id", "file", "label", "seed", "method", "max_score"])
    table.to_csv(staging / "index.csv", index=False)
    np.save(staging / "embeddings.npy", np.asarray(embeddings, dtype=np.float32)[keep])
    payload = {"method": method, "removed": int(n - len(keep)), "embedding_name": embedding_name,
               "neighbours": neighbours, "cases": rows,
               "embeddings": np.round(np.asarray(embeddings[keep], dtype=np.float64), 5).tolist()}
    # "</" cannot appear inside the JSON script element: escape it.
    write_text_atomic(staging / "viewer.html", VIEWER.replace("__DATA__", json.dumps(payload).replace("</", "<\\/")))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return {"cases": len(keep), "removed": int(n - len(keep)), "method": method, "folder": str(folder)}
