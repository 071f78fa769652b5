"""The evaluation report: one HTML page, one row per prompt, for people who would rather look than read.

A row holds the prompt (and its input image when editing), then each sample of the model (output
image, reasoning text, the snapshots along the trajectory, every judge's scores) with the baseline's
same sample beside it. Images are the eval folder's own files, linked by relative path (the folder
moves as a whole). An image that fails to load is marked on the page (and counted in its title), so
a check in a headless browser sees what a person would.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
img.out,img.in{width:160px;image-rendering:pixelated}img.snap{max-width:480px}
.text{max-width:280px;font-size:0.9em;white-space:pre-wrap}.scores{font-size:0.8em;color:#444}
.missing{outline:3px solid red}.summary td{text-align:right}
"""
SCRIPT = """
addEventListener('load',()=>{const imgs=[...document.images];
 const bad=imgs.filter(i=>!i.complete||i.naturalWidth===0);bad.forEach(i=>i.classList.add('missing'));
 document.title=`eval report: ${imgs.length-bad.length}/${imgs.length} images`;
 document.body.dataset.images=imgs.length;document.body.dataset.broken=bad.length;});
"""


def _img(path: Path, root: Path, cls: str) -> str:
    if not path.is_file():
        return ""
    return f'<img class="{cls}" src="{html.escape(os.path.relpath(path, root))}" alt="{html.escape(path.name)}">'


def _scores(judgments: dict[str, dict[str, Any]], key: str) -> str:
    parts = []
    for name, samples in judgments.items():
        values = samples.get(key) or {}
        cells = ", ".join(f"{k} {'missing' if v is None else f'{v:.3g}'}" for k, v in values.items())
        parts.append(f"<b>{html.escape(name)}</b>: {html.escape(cells) or '-'}")
    return "<br>".join(parts)


def _cell(out: Path, tag: str, key: str, judgments: dict[str, dict[str, dict]], root: Path) -> str:
    folder = out / "samples" / tag
    meta_file = folder / f"{key}.json"
    if not meta_file.is_file():
        return "<td>not sampled</td>"
    meta = json.loads(meta_file.read_text())
    by_judge = {name: by_tag.get(tag, {}) for name, by_tag in judgments.items()}
    return (f"<td>{_img(folder / f'{key}.png', root, 'out')}<div class='text'>{html.escape(meta['text'])}</div>"
            f"<div class='scores'>{_scores(by_judge, key)}</div>"
            f"<details><summary>snapshots</summary>{_img(folder / f'{key}-snapshots.png', root, 'snap')}</details></td>")


def score_cells(row: dict[str, Any], with_n: bool = False) -> tuple[str, str, str]:
    """One score's cells: each model's mean ± standard error, and the paired difference [95% interval];
    the printed table and the report's summary both show these."""
    cells = [f"{row[t]['mean']:.4f} ± {row[t]['se']:.4f}" + (f" (n {row[t]['n']})" if with_n else "") if t in row else ""
             for t in ("model", "baseline")]
    d = row.get("difference")
    return cells[0], cells[1], f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]" if d else ""


def _summary(scores: dict[str, Any]) -> str:
    rows = []
    for key, row in scores.items():
        model, baseline, diff = score_cells(row, with_n=True)
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{model}</td><td>{baseline}</td><td>{diff}</td></tr>")
    return ("<table class='summary'><tr><th>score</th><th>model</th><th>baseline</th><th>difference [95% CI]</th></tr>"
            + "".join(rows) + "</table>")


def write_report(out: Path, records: list, samples: int, models: dict[str, str], judgments: dict[str, dict[str, dict]],
                 scores: dict[str, Any], inputs: dict[int, Path]) -> Path:
    """``out/report.html``; ``inputs`` maps a record to its input image as copied into the folder."""
    tags = [t for t in ("model", "baseline") if t in models]
    head = "".join(f"<th>{t}: {html.escape(str(models[t]))}</th>" for t in tags)
    body = []
    for i, rec in enumerate(records):
        for k in range(samples):
            key = f"{i:05d}-{k:02d}"
            prompt = "" if k else (f"<td rowspan='{samples}'><b>{html.escape(rec.task)}</b><div class='text'>"
                                   f"{html.escape(rec.prompt)}</div>{_img(inputs[i], out, 'in') if i in inputs else ''}"
                                   + (f"<div class='scores'>answer: {html.escape(rec.answer)}</div>" if rec.answer else "")
                                   + "</td>")
            body.append(f"<tr>{prompt}<td>{k}</td>" + "".join(_cell(out, t, key, judgments, out) for t in tags) + "</tr>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>eval report</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body><h1>pararl eval</h1>{_summary(scores)}<h2>samples</h2>"
            f"<table><tr><th>prompt</th><th>sample</th>{head}</tr>{''.join(body)}</table></body></html>")
    path = out / "report.html"
    path.write_text(page)
    return path
