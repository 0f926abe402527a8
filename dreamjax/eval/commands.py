"""`dreamjax eval {vqa,caption,clip-score,fid}`: arguments and entry points.

Wiring into `dreamjax/cli.py` (`build_parser`):

    from dreamjax.eval import commands as eval_commands
    ev = sub.add_parser("eval", help="benchmarks: VQAv2 accuracy, COCO captions, CLIP score, FID")
    eval_commands.add_arguments(ev)
    ev.set_defaults(func=eval_commands.main)

Importing this module starts no JAX backend (the heavy imports are inside the commands).
"""

from __future__ import annotations

import argparse
import os

PROTOCOLS = {
    # spec 4.1: MS-COCO zero-shot: 8 seeds (42-49) per caption, the best by CLIP ViT-L/14, 150 DDPM steps, CFG 2
    "coco": {"steps": 150, "guidance": 2.0, "num_candidates": 8, "seed": 42, "sampler": "ddpm"},
    # LN-COCO: 1 sample per caption, no re-rank, 100 steps, CFG 5 (the DreamLLM default of the script)
    "ln-coco": {"steps": 100, "guidance": 5.0, "num_candidates": 1, "seed": 42, "sampler": "ddpm"},
}


def _common(p: argparse.ArgumentParser, checkpoint_required: bool = True) -> None:
    p.add_argument("--checkpoint", required=checkpoint_required, help="a `dreamjax train` / `import` workdir")
    p.add_argument("--out", required=True, help="output folder: results.jsonl (resumable), report.json, index.html")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--batch", type=int, default=32, help="items per device batch (padded to the data parallelism)")
    p.add_argument("--mesh", default=None, help="mesh axis overrides, e.g. data=8,fsdp=1 (default: the run's)")
    p.add_argument("--no-progress", action="store_true")


def _generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captions", help="captions: a text file (one per line) or a COCO captions JSON")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="coco",
                   help="coco: 150 DDPM steps, CFG 2.0, best of 8 (seeds 42-49) by CLIP; ln-coco: 100 steps, "
                        "CFG 5.0, 1 sample. The flags below override single settings")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None)
    p.add_argument("--num-candidates", type=int, default=None, help="images per caption (best by --clip if > 1)")
    p.add_argument("--seed", type=int, default=None, help="candidate j uses seed + j")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--resolution", type=int, default=256, help="generated images are resized to this side")
    p.add_argument("--clip", default=None, metavar="CLIP_DIR", help="a local transformers CLIPModel directory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)

    v = sub.add_parser("vqa", help="VQAv2-style accuracy (official answer normalisation, 10-choose-9 average)")
    _common(v)
    v.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    v.add_argument("--annotations", default=None, help="VQAv2 annotations JSON (without: predictions only)")
    v.add_argument("--images", required=True, help="image folder")
    v.add_argument("--image-pattern", default="COCO_val2014_{:012d}.jpg", help="file name of an image id")
    v.add_argument("--prompt-template", choices=("upstream", "llava", "plain"), default="upstream")
    v.add_argument("--max-new-tokens", type=int, default=10)

    c = sub.add_parser("caption", help="COCO captioning: BLEU-1..4 and CIDEr-D")
    _common(c)
    c.add_argument("--captions", required=True, help="COCO captions JSON (images + annotations)")
    c.add_argument("--images", required=True, help="image folder")
    c.add_argument("--image-pattern", default=None, help="file name of an image id (default: the JSON's file_name)")
    c.add_argument("--prompt-template", choices=("upstream", "plain"), default="upstream")
    c.add_argument("--max-new-tokens", type=int, default=30)

    s = sub.add_parser("clip-score", help="CLIP score of generated images against their captions")
    _common(s, checkpoint_required=False)
    _generation(s)
    s.add_argument("--generated", default=None, help="score the images of an earlier `eval fid` / `clip-score` "
                                                     "output folder instead of generating (no --checkpoint)")

    f = sub.add_parser("fid", help="zero-shot FID: generate for captions, InceptionV3 pool3 statistics")
    _common(f)
    _generation(f)
    f.add_argument("--inception", required=True, help="pytorch-fid's weights file (or its folder); "
                                                      "'random' for a smoke test")
    f.add_argument("--reference-stats", default=None, help="reference statistics .npz (mu, sigma)")
    f.add_argument("--reference-images", default=None, help="or a folder of real images (statistics cached in --out)")


def _require(value, flag: str, command: str):
    if value is None:
        raise ValueError(f"eval {command} needs {flag}")
    return value


def main(args: argparse.Namespace, extra=()) -> int:
    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    os.makedirs(args.out, exist_ok=True)
    command = args.eval_command
    if command in ("vqa", "caption"):
        rep = _understanding(args)
    elif command == "clip-score":
        rep = _clip_score(args)
    else:
        rep = _fid(args)
    keys = {"vqa": ("accuracy",), "caption": ("cider_d", "bleu_4"), "clip-score": ("clip_score",), "fid": ("fid",)}
    for k in keys[command]:
        if k in rep:
            print(f"{k.replace('_', '-') if command != 'caption' else k}={rep[k]:.4f}")
    print(f"report: {os.path.join(args.out, 'report.json')}")
    return 0


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`data=8,fsdp=1` -> {'data': 8, 'fsdp': 1}, as `dreamjax generate --mesh` (eval sits below cli.py)."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, size = item.partition("=")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            raise ValueError(f"--mesh: {item!r} is not AXIS=SIZE (e.g. --mesh data=8,fsdp=1,tensor=1)") from None
    return out


def _load(args):
    from dreamjax.run.assembly import load_run

    return load_run(args.checkpoint, mesh_overrides=parse_mesh(args.mesh))


def _understanding(args) -> dict:
    from dreamjax.eval import caption, understanding, vqa

    settings = understanding.TextSettings(max_new_tokens=args.max_new_tokens, batch=args.batch,
                                          prompt_template=args.prompt_template)
    if args.eval_command == "vqa":
        items = vqa.load_questions(args.questions, args.annotations)[: args.limit]
        run = _load(args)
        return understanding.evaluate_vqa(run, items, args.images, args.out, settings,
                                          image_pattern=args.image_pattern, progress=not args.no_progress)
    items = caption.load_coco_captions(args.captions)[: args.limit]
    run = _load(args)
    return understanding.evaluate_captions(run, items, args.images, args.out, settings,
                                           image_pattern=args.image_pattern, progress=not args.no_progress)


def _gen_settings(args):
    from dreamjax.eval.generation import GenSettings

    preset = dict(PROTOCOLS[args.protocol])
    for key in ("steps", "guidance", "num_candidates", "seed", "sampler"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["num_candidates"] > 1 and not args.clip:
        raise ValueError(f"{preset['num_candidates']} candidates per caption are re-ranked by CLIP: pass --clip DIR "
                         "(a local CLIPModel) or --num-candidates 1")
    return GenSettings(protocol=args.protocol, negative_prompt=args.negative_prompt, resolution=args.resolution,
                       batch=args.batch, **preset)


def _clip_score(args) -> dict:
    from dreamjax.eval import generation

    clip = _require(args.clip, "--clip DIR", "clip-score")
    if args.generated:
        return generation.clip_score_of_folder(args.generated, clip, args.out, limit=args.limit, batch=args.batch,
                                               progress=not args.no_progress)
    captions = generation.load_captions(_require(args.captions, "--captions (or --generated)", "clip-score"),
                                        args.limit)
    _require(args.checkpoint, "--checkpoint (or --generated)", "clip-score")
    settings = _gen_settings(args)
    run = _load(args)
    return generation.evaluate_clip_score(run, captions, args.out, settings, clip, progress=not args.no_progress)


def _fid(args) -> dict:
    from dreamjax.eval import generation

    if not args.reference_stats and not args.reference_images:
        raise ValueError("eval fid needs --reference-stats NPZ or --reference-images DIR")
    captions = generation.load_captions(_require(args.captions, "--captions", "fid"), args.limit)
    settings = _gen_settings(args)
    run = _load(args)
    return generation.evaluate_fid(run, captions, args.out, settings, inception=args.inception, clip=args.clip,
                                   reference_stats=args.reference_stats, reference_images=args.reference_images,
                                   progress=not args.no_progress)


def cli(argv: list[str]) -> int:
    """`dreamjax eval ...` on its own (tests; the real entry is `dreamjax/cli.py`), with its one-line errors."""
    import sys

    parser = argparse.ArgumentParser(prog="dreamjax eval")
    add_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    try:
        return main(args, extra)
    except (ValueError, KeyError, FileNotFoundError, TypeError, OSError) as e:
        print(f"dreamjax eval: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
