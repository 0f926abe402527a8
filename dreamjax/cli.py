"""`dreamjax` command line: train, generate, demo.

A user error (bad path, bad config value, bad mesh) exits non-zero with one clear line, not a traceback;
`DREAMJAX_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import logging
import os
import sys
import time

from ml_collections import ConfigDict

log = logging.getLogger("dreamjax")

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, TypeError, OSError)


# ------------------------------------------------------------------------------------------------ config


def load_config(spec: str, overrides: list[str] = ()) -> ConfigDict:
    """`configs/tiny.py[:ARG]` -> get_config(ARG), then `--config.a.b=value` overrides."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:  # configs import their siblings as `configs.common`
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_dreamjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    config = module.get_config(arg or None)
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ConfigDict, item: str) -> None:
    if not item.startswith("--config.") or "=" not in item:
        raise ValueError(f"unrecognised argument {item!r}; overrides look like --config.train.steps=100")
    key, _, raw = item[len("--config."):].partition("=")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        if p not in node:
            raise KeyError(f"--config.{key}: no such config section {p!r}")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"--config.{key}: no such config key; known keys here: {sorted(node.keys())}")
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
        node[leaf] = value


def parse_mesh(spec: str | None) -> dict[str, int]:
    """`data=1,fsdp=-1` -> {'data': 1, 'fsdp': -1} (mesh axis overrides for generation)."""
    out = {}
    for item in filter(None, (spec or "").split(",")):
        name, eq, size = item.partition("=")
        try:
            out[name.strip()] = int(size)
        except ValueError:
            eq = ""
        if not eq:
            raise ValueError(f"--mesh: {item!r} is not AXIS=SIZE (e.g. --mesh data=1,fsdp=-1,tensor=1)")
    return out


# ------------------------------------------------------------------------------------------------ commands


def _init_distributed(args) -> None:
    """Multi-host: JAX's own multi-controller runtime, configured from flags or the environment
    (TPU pods and SLURM are auto-detected by `jax.distributed.initialize()`)."""
    import jax

    if args.coordinator or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif os.environ.get("DREAMJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def cmd_train(args, extra) -> int:
    from dreamjax.train.loop import train

    _init_distributed(args)
    config = load_config(args.config, extra)
    metrics = train(config, args.workdir, progress=not args.no_progress)
    log.info("done: %s", {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})
    return 0


def cmd_generate(args, extra) -> int:
    import numpy as np

    from dreamjax.data import images as imgs
    from dreamjax.infer.decode import generate_text
    from dreamjax.infer.text_to_image import text_to_image
    from dreamjax.run.assembly import load_run

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    run = load_run(args.checkpoint, mesh_overrides=parse_mesh(args.mesh))
    os.makedirs(args.out, exist_ok=True)
    side = run.model_config.vision.image_size
    pixels = None
    if args.image:
        pixels = np.stack([imgs.clip_preprocess(imgs.decode_image(p, name=p), side) for p in args.image])
    if args.mode == "image":
        settings = run.sample_settings(steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                                       negative_prompt=args.negative_prompt)
        out = text_to_image(run, [args.prompt] * args.num_images, settings, seed=args.seed, images_in=pixels)
        for i, x in enumerate(out):
            print(imgs.save_png(imgs.to_uint8(x), os.path.join(args.out, f"image_{args.seed}_{i}.png")))
        return 0
    # text mode: the conversation template, as the model was trained on conversations
    ids = run.text_prompt(args.prompt, num_images=0 if pixels is None else len(pixels))
    mask = None if pixels is None else np.ones((1, len(pixels)), bool)
    out = generate_text(run.model, run.params, [ids], images_in=None if pixels is None else pixels[None],
                        images_in_mask=mask, max_new_tokens=args.max_new_tokens, stop_ids=[run.specials.eos],
                        temperature=args.temperature, seed=args.seed)[0]
    answer = run.tokenizer.decode(out, skip_special_tokens=True).strip()
    with open(os.path.join(args.out, "answer.txt"), "w") as f:
        f.write(answer + "\n")
    print(answer)
    return 0


def cmd_demo(args, extra) -> int:
    """Train configs/tiny.py on the shapes world, then measure and write samples."""
    from dreamjax.eval.demo import evaluate
    from dreamjax.run.assembly import load_run
    from dreamjax.train.loop import train

    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    config = load_config(args.config or config_path, extra)
    t0 = time.time()
    metrics = train(config, args.workdir, progress=not args.no_progress)
    t_train = time.time() - t0
    log.info("training took %.0f s (final loss %.4f)", t_train, metrics.get("loss", float("nan")))
    run = load_run(args.workdir)
    out_dir = os.path.join(args.workdir, "samples")
    scores = evaluate(run, out_dir, n=args.num_eval)
    print(f"train_seconds={t_train:.0f}")
    print(f"samples written to {out_dir}")
    print(f"color_accuracy={scores['color_accuracy']:.2f}")
    print(f"vqa_accuracy={scores['vqa_accuracy']:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamjax", description="DreamLLM in JAX/Flax.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a config (overrides: --config.key=value ...)")
    t.add_argument("--config", required=True, help="PATH[:ARG] of an ml_collections config file")
    t.add_argument("--workdir", required=True)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--coordinator", default=None, help="jax.distributed coordinator host:port (multi-host)")
    t.add_argument("--num-processes", type=int, default=None)
    t.add_argument("--process-id", type=int, default=None)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="text or images from a trained workdir")
    g.add_argument("--checkpoint", required=True, help="a `dreamjax train` workdir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--mode", choices=("text", "image"), default="text")
    g.add_argument("--out", required=True)
    g.add_argument("--steps", type=int, default=None, help="diffusion sampling steps (default: config)")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale (default: config)")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="default: config")
    g.add_argument("--negative-prompt", default=None, help="default: config (\"\": the readout after BOS)")
    g.add_argument("--mesh", default=None,
                   help="mesh axis overrides, e.g. data=1,fsdp=-1 (default: the run's config.mesh)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image", action="append", help="input image file (repeatable)")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="train the tiny config on the shapes world and report two skills")
    d.add_argument("--workdir", default="workdirs/demo")
    d.add_argument("--config", default=None, help="default: configs/tiny.py")
    d.add_argument("--num-eval", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax reports expected partial restores as warnings
    try:
        return args.func(args, extra)
    except USER_ERRORS as e:
        if os.environ.get("DREAMJAX_DEBUG"):
            raise
        print(f"dreamjax {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
