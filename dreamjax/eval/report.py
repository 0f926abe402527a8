"""What every `dreamjax eval` writes to its output folder, and how it resumes:

    results.jsonl   one JSON record per evaluated item, appended (and flushed) as each batch completes; an
                    interrupted eval run again with the same --out skips the items already there
    report.json     the metrics, the settings and the counts, written at the end
    index.html      a page of samples: images beside their prompts, or questions / answers beside images

Only process 0 writes (multi-host runs compute the same items on every process).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
REPORT = "report.json"
PAGE = "index.html"


def is_writer() -> bool:
    import jax

    return jax.process_index() == 0


class ResultsLog:
    """The per-item records of one eval in `out_dir/results.jsonl`, keyed by `key` (e.g. question_id).

    A line cut short by an interruption is dropped on load (the item is evaluated again); a record whose
    settings differ from this run's (`fingerprint`) refuses to mix: a different --out is needed."""

    def __init__(self, out_dir: str, key: str, fingerprint: dict | None = None):
        self.path = os.path.join(out_dir, RESULTS)
        self.key = key
        self.records: dict[Any, dict] = {}
        self.fingerprint = fingerprint
        os.makedirs(out_dir, exist_ok=True)
        meta_path = os.path.join(out_dir, "settings.json")
        if fingerprint is not None:
            if os.path.exists(meta_path) and os.path.exists(self.path):
                with open(meta_path) as f:
                    old = json.load(f)
                if old != json.loads(json.dumps(fingerprint)):
                    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
                    raise ValueError(f"{out_dir} holds results of an eval with other settings ({', '.join(changed)}); "
                                     "use another --out (or delete it) to start over")
            if is_writer():
                with open(meta_path, "w") as f:
                    json.dump(fingerprint, f, indent=1)
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        log.warning("%s: dropping a truncated line (an interrupted write)", self.path)
                        continue
                    self.records[record[key]] = record
            if self.records:
                log.info("resuming: %d items already in %s", len(self.records), self.path)

    def done(self, item_key) -> bool:
        return item_key in self.records

    def todo(self, items: Iterable[dict]) -> list[dict]:
        return [it for it in items if it[self.key] not in self.records]

    def extend(self, records: Sequence[dict]) -> None:
        for r in records:
            self.records[r[self.key]] = r
        if not is_writer() or not records:
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def ordered(self, items: Iterable[dict]) -> list[dict]:
        """The records of `items`, in their order."""
        return [self.records[it[self.key]] for it in items if it[self.key] in self.records]


def write_report(out_dir: str, report: dict) -> str:
    path = os.path.join(out_dir, REPORT)
    if is_writer():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "<br>".join(html.escape(str(v)) for v in value)
    return html.escape(str(value))


def write_page(out_dir: str, title: str, metrics: dict, rows: Sequence[dict], columns: Sequence[str], *,
               image_key: str | None = "image", image_width: int = 192) -> str:
    """index.html: the metrics, then a table of `rows` (the first few items) with an image column (a path,
    made relative to out_dir when inside it) and the `columns` given."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ([image_key] if image_key else []) + list(columns))
    body = []
    for r in rows:
        cells = []
        if image_key:
            src = r.get(image_key)
            if src:
                rel = os.path.relpath(src, out_dir) if os.path.abspath(src).startswith(os.path.abspath(out_dir)) \
                    else "file://" + os.path.abspath(src)
                cells.append(f'<td><img src="{html.escape(rel)}" width="{image_width}" '
                             'style="image-rendering: pixelated"></td>')
            else:
                cells.append("<td></td>")
        cells += [f"<td>{_cell(r.get(c, ''))}</td>" for c in columns]
        body.append("<tr>" + "".join(cells) + "</tr>")
    summary = "".join(f"<li><b>{html.escape(str(k))}</b>: {_cell(v)}</li>" for k, v in metrics.items()
                      if not isinstance(v, dict))
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>\n<style>td, th {{ border: 1px solid #ccc; padding: 4px; "
            "vertical-align: top }} table { border-collapse: collapse }</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<ul>{summary}</ul>\n<table>\n<tr>{head}</tr>\n"
            + "\n".join(body) + "\n</table>\n</body></html>\n")
    path = os.path.join(out_dir, PAGE)
    if is_writer():
        with open(path, "w") as f:
            f.write(page)
    return path


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar (a no-op object when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, unit="item")
