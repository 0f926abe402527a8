"""Generation results on disk: `output.json` for every mode, and an interleaved document as `index.html`
(text and `<img>` tags in order) plus `document.md`, with its images as PNGs beside them."""

from __future__ import annotations

import html
import json
import os
from typing import Any

from dreamjax.data import images as imgs

PIXELATED = "image-rendering: pixelated"  # tiny demo images stay crisp when the page scales them up


def write_json(out_dir: str, record: dict[str, Any]) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "output.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def write_document(doc, out_dir: str, *, title: str | None = None, image_width: int = 256) -> dict[str, Any]:
    """index.html, document.md and image_{k}.png for a `Document`; returns the segments as JSON records
    (text, or the image's file name) for `output.json`."""
    os.makedirs(out_dir, exist_ok=True)
    records, html_parts, md_parts = [], [], []
    for seg in doc.segments:
        if seg.kind == "text":
            records.append({"text": seg.text})
            html_parts.append(f"<p>{html.escape(seg.text)}</p>")
            md_parts.append(seg.text)
        else:
            name = f"image_{seg.index}.png"
            imgs.save_png(seg.image, os.path.join(out_dir, name))
            records.append({"image": name})
            html_parts.append(f'<p><img src="{name}" width="{image_width}" style="{PIXELATED}" '
                              f'alt="generated image {seg.index}"></p>')
            md_parts.append(f"![generated image {seg.index}]({name})")
    title = title or doc.prompt
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title></head>\n<body style=\"max-width: 40em; margin: auto\">\n"
            f"<p><b>{html.escape(doc.prompt)}</b></p>\n" + "\n".join(html_parts) + "\n</body></html>\n")
    with open(os.path.join(out_dir, "index.html"), "w") as f:
        f.write(page)
    with open(os.path.join(out_dir, "document.md"), "w") as f:
        f.write(f"**{doc.prompt}**\n\n" + "\n\n".join(md_parts) + "\n")
    return {"segments": records, "stop": doc.stop}
