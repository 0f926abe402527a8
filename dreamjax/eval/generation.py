"""Text -> image evaluations on a loaded run (spec 4.1): zero-shot FID (MS-COCO / LN-COCO protocols) and CLIP score.

Candidate j of caption k is drawn with seed `seed + j` and image index k (`infer/text_to_image.image_keys`), so
upstream's "one folder per seed 42..49, then pick the best by CLIP" becomes: each caption's image is the same
whatever batch, mesh or resumption it is drawn in. The kept image is resized to `resolution` (256, the side of
upstream's reference statistics; PIL bicubic) and saved as `images/{k:06d}.png`; its record (caption, seed,
candidate CLIP scores) goes to `results.jsonl` as each batch completes, so an interrupted eval resumes.

FID: InceptionV3 pool3 statistics (`eval/inception.py`, pytorch-fid's network and weights) of the kept images
against reference statistics (an `.npz` with `mu`, `sigma`) or a folder of real images (shortest side resized
to `resolution` with PIL bicubic, then center-cropped square: an assumption about how upstream's
`fid_stats_mscoco256_val.npz` was made).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dreamjax.data import images as imgs
from dreamjax.eval import clip_score, fid, report
from dreamjax.run.assembly import Run

log = logging.getLogger(__name__)

PAGE_ITEMS = 100
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class GenSettings:
    protocol: str = "coco"
    steps: int = 150
    guidance: float = 2.0
    sampler: str = "ddpm"
    num_candidates: int = 8
    seed: int = 42
    negative_prompt: str = ""
    resolution: int = 256
    batch: int = 32

    def __post_init__(self):
        if self.num_candidates < 1 or self.steps < 1 or self.resolution < 1:
            raise ValueError(f"num_candidates, steps and resolution must be >= 1: {self}")


def load_captions(path: str, limit: int | None = None) -> list[dict]:
    """[{"index", "caption"}]: a COCO captions JSON (every annotation, in file order, with its image_id), a JSON
    list of strings, or a text file with one caption per line (blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict):
            if "annotations" not in data:
                raise ValueError(f"{path}: a COCO captions JSON needs 'annotations'")
            rows = [{"caption": a["caption"].strip(), "image_id": a.get("image_id")} for a in data["annotations"]]
        else:
            rows = [{"caption": str(c).strip()} for c in data]
    else:
        with open(path) as f:
            rows = [{"caption": line.strip()} for line in f if line.strip()]
    rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path} has no captions")
    return [{"index": i, **r} for i, r in enumerate(rows)]


def resize_square(img: np.ndarray, side: int) -> np.ndarray:
    if img.shape[0] == side and img.shape[1] == side:
        return img
    return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BICUBIC))


def resize_center_crop(img: np.ndarray, side: int) -> np.ndarray:
    img = imgs.resize_shortest_edge(img, side, Image.Resampling.BICUBIC)
    return imgs.center_crop(img, side, side)


def _contiguous_chunks(items: list[dict], batch: int) -> list[list[dict]]:
    """Batches of consecutive caption indices (a row's image keys come from its index: `first_index + b`)."""
    chunks: list[list[dict]] = []
    for it in items:
        if chunks and len(chunks[-1]) < batch and chunks[-1][-1]["index"] + 1 == it["index"]:
            chunks[-1].append(it)
        else:
            chunks.append([it])
    return chunks


def generate(run: Run, captions: list[dict], out_dir: str, settings: GenSettings, scorer=None, *,
             progress: bool = True) -> list[dict]:
    """The kept image of every caption (see the module doc); returns the records in caption order."""
    from dreamjax.infer.text_to_image import generate_images

    run.check_generation("image", False)
    fingerprint = {"eval": "generate", "checkpoint": run.workdir, "step": run.step, **dataclasses.asdict(settings),
                   "batch": None, "clip": getattr(scorer, "path", None)}
    results = report.ResultsLog(out_dir, "index", fingerprint)
    negative = run.image_prompt(settings.negative_prompt)
    todo = results.todo(captions)
    bar = report.progress(len(captions), "generate", progress, initial=len(captions) - len(todo))
    for chunk in _contiguous_chunks(todo, settings.batch):
        texts = [c["caption"] for c in chunk]
        prompts = [run.image_prompt(t) for t in texts]
        cands = np.stack([imgs.to_uint8(generate_images(
            run.model, run.params, run.schedule, prompts, negative=negative, num_steps=settings.steps,
            guidance=settings.guidance, sampler=settings.sampler, seed=settings.seed + j, first_index=chunk[0]["index"],
            mesh=run.mesh, rules=run.rules)) for j in range(settings.num_candidates)], axis=1)  # [B, N, R, R, 3]
        b, n = cands.shape[:2]
        cos = None
        if scorer is not None:
            flat = cands.reshape((b * n,) + cands.shape[2:])
            cos = clip_score.cosines(scorer, flat, [t for t in texts for _ in range(n)]).reshape(b, n)
        records = []
        for i, c in enumerate(chunk):
            best = int(np.argmax(cos[i])) if cos is not None else 0
            path = imgs.save_png(resize_square(cands[i, best], settings.resolution),
                                 os.path.join(out_dir, "images", f"{c['index']:06d}.png"))
            rec = {**c, "image": path, "seed": settings.seed + best}
            if cos is not None:
                rec["clip_cosine"] = float(cos[i, best])
                rec["candidate_cosines"] = [float(x) for x in cos[i]]
            records.append(rec)
        results.extend(records)
        bar.update(len(chunk))
    bar.close()
    return results.ordered(captions)


def _page(out_dir: str, title: str, rep: dict, records: Sequence[dict]) -> None:
    rows = [{**r, "clip_score": 100 * r["clip_cosine"] if "clip_cosine" in r else ""} for r in records[:PAGE_ITEMS]]
    report.write_page(out_dir, title, {k: v for k, v in rep.items() if k != "settings"}, rows,
                      ["index", "caption", "seed", "clip_score"])


# ------------------------------------------------------------------------------------------------ CLIP score


def _scorer(clip: str | None):
    if not clip:
        return None
    from dreamjax.infer.rerank import ClipReranker

    scorer = ClipReranker(clip)
    scorer.path = os.path.abspath(clip)
    return scorer


def evaluate_clip_score(run: Run, captions: list[dict], out_dir: str, settings: GenSettings, clip: str, *,
                        progress: bool = True) -> dict:
    records = generate(run, captions, out_dir, settings, _scorer(clip), progress=progress)
    rep = {"eval": "clip-score", **clip_score.summarize([r["clip_cosine"] for r in records]), "clip": clip,
           "checkpoint": run.workdir, "step": run.step, "settings": dataclasses.asdict(settings)}
    report.write_report(out_dir, rep)
    _page(out_dir, "CLIP score", rep, records)
    return rep


def clip_score_of_folder(generated: str, clip: str, out_dir: str, *, limit: int | None = None, batch: int = 32,
                         progress: bool = True) -> dict:
    """CLIP score of the images an earlier `eval fid` / `eval clip-score` kept (its results.jsonl)."""
    path = os.path.join(generated, report.RESULTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--generated: {path} not found (an `eval fid` / `eval clip-score` output folder)")
    with open(path) as f:
        items = [json.loads(line) for line in f if line.strip()]
    items = sorted(items, key=lambda r: r["index"])[:limit]
    scorer = _scorer(clip)
    results = report.ResultsLog(out_dir, "index", {"eval": "clip-score", "generated": os.path.abspath(generated),
                                                   "clip": scorer.path})
    todo = results.todo(items)
    bar = report.progress(len(items), "clip-score", progress, initial=len(items) - len(todo))
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        pics = np.stack([imgs.decode_image(r["image"], name=r["image"]) for r in chunk])
        cos = clip_score.cosines(scorer, pics, [r["caption"] for r in chunk])
        results.extend([{"index": r["index"], "caption": r["caption"], "image": r["image"], "clip_cosine": float(c)}
                        for r, c in zip(chunk, cos)])
        bar.update(len(chunk))
    bar.close()
    records = results.ordered(items)
    rep = {"eval": "clip-score", **clip_score.summarize([r["clip_cosine"] for r in records]), "clip": clip,
           "generated": generated}
    report.write_report(out_dir, rep)
    _page(out_dir, "CLIP score", rep, records)
    return rep


# ------------------------------------------------------------------------------------------------ FID


def inception_extractor(weights: str, batch: int, mesh=None, rules=None):
    """pool3 features of uint8 images: pytorch-fid's weights file, or `random` (a smoke test: meaningless)."""
    from dreamjax.eval import inception

    if weights == "random":
        log.warning("fid: RANDOM Inception weights (--inception random): the number is only a smoke test")
        params = inception.random_params()
    else:
        params = inception.load_fid_weights(weights)
    return inception.InceptionFeatures(params, batch=batch, mesh=mesh, rules=rules)


def folder_stats(paths: Sequence[str], extractor, *, resolution: int | None, batch: int, desc: str,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the images at `paths`, read batch by batch (resize_center_crop to `resolution` if given)."""
    from dreamjax.eval.inception import FEATURE_DIM

    stats = fid.RunningStats(FEATURE_DIM)
    bar = report.progress(len(paths), desc, progress)
    for start in range(0, len(paths), batch):
        pics = [imgs.decode_image(p, name=p) for p in paths[start:start + batch]]
        if resolution:
            pics = [resize_center_crop(p, resolution) for p in pics]
        stats.update(extractor(np.stack(pics)))
        bar.update(len(pics))
    bar.close()
    return stats.finalize()


def reference_statistics(out_dir: str, extractor, *, stats_path: str | None, images_dir: str | None,
                         resolution: int, batch: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    if stats_path:
        return (*fid.load_stats(stats_path), stats_path)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"--reference-images: folder not found: {images_dir}")
    cache = os.path.join(out_dir, "reference_stats.npz")
    if os.path.isfile(cache):
        return (*fid.load_stats(cache), cache)
    paths = sorted(os.path.join(images_dir, f) for f in os.listdir(images_dir) if f.lower().endswith(IMAGE_EXTS))
    if len(paths) < 2:
        raise ValueError(f"--reference-images: {images_dir} holds {len(paths)} images; FID needs at least 2")
    mu, sigma = folder_stats(paths, extractor, resolution=resolution, batch=batch, desc="reference", progress=progress)
    if report.is_writer():
        fid.save_stats(cache, mu, sigma)
    return mu, sigma, cache


def evaluate_fid(run: Run, captions: list[dict], out_dir: str, settings: GenSettings, *, inception: str,
                 clip: str | None = None, reference_stats: str | None = None, reference_images: str | None = None,
                 progress: bool = True) -> dict:
    extractor = inception_extractor(inception, settings.batch, run.mesh, run.rules)  # fail early on a bad path
    records = generate(run, captions, out_dir, settings, _scorer(clip), progress=progress)
    ref_mu, ref_sigma, ref_source = reference_statistics(
        out_dir, extractor, stats_path=reference_stats, images_dir=reference_images, resolution=settings.resolution,
        batch=settings.batch, progress=progress)
    mu, sigma = folder_stats([r["image"] for r in records], extractor, resolution=None, batch=settings.batch,
                             desc="inception", progress=progress)
    if report.is_writer():
        fid.save_stats(os.path.join(out_dir, "generated_stats.npz"), mu, sigma)
    value = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    rep = {"eval": "fid", "fid": value, "images": len(records), "reference": ref_source, "inception": inception,
           "clip": clip, "checkpoint": run.workdir, "step": run.step, "settings": dataclasses.asdict(settings)}
    if records and "clip_cosine" in records[0]:
        rep.update({f"kept_{k}": v for k, v in clip_score.summarize([r["clip_cosine"] for r in records]).items()
                    if k != "images"})
    report.write_report(out_dir, rep)
    _page(out_dir, f"FID ({settings.protocol})", rep, records)
    return rep
