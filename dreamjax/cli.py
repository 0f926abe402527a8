"""`dreamjax` command line: train, generate, eval, demo, prepare, import, export, aot.

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

from dreamjax import runtime

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
    (TPU pods and SLURM are auto-detected by `jax.distributed.initialize()`).

    Runs before anything touches a JAX backend (`initialize` refuses afterwards). Processes on CPU need a
    cross-process collectives implementation for their all-reduces, else the CPU client has none: gloo over
    TCP, through the coordinator. That is JAX 0.10's default; it is set here only where it was unset
    (`JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi` still wins). It only affects the CPU client."""
    import jax

    flags = args.coordinator is not None or args.num_processes is not None or args.process_id is not None
    if not flags and os.environ.get("DREAMJAX_DISTRIBUTED") != "1":
        return
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if flags:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _sampler():
    """The text-to-image sampler for `train.sample_every` (passed in: `train/` sits below `infer/`)."""
    from dreamjax.infer.text_to_image import text_to_image

    return text_to_image


def cmd_train(args, extra) -> int:
    _init_distributed(args)  # before the training modules are imported: nothing may start a backend first
    from dreamjax.train.loop import train

    config = load_config(args.config, extra)
    metrics = train(config, args.workdir, progress=not args.no_progress, sampler=_sampler())
    log.info("done: %s", {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})
    return 0


def cmd_generate(args, extra) -> int:
    from dreamjax.infer import modes
    from dreamjax.run.assembly import load_run

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    if args.prompt is None and args.mode != "chat":
        raise ValueError(f"--prompt is required in --mode {args.mode}")
    run = load_run(args.checkpoint, mesh_overrides=parse_mesh(args.mesh))
    run.check_generation(args.mode, bool(args.image))  # a checkpoint with some parts (an imported LLM)
    os.makedirs(args.out, exist_ok=True)
    # every default is the run's own (config.sample), as the demo evaluation uses
    settings = run.sample_settings(
        steps=args.steps, guidance=args.guidance, sampler=args.sampler, negative_prompt=args.negative_prompt,
        num_images=args.num_images, rerank=args.rerank, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    pixels = modes.load_images(run, args.image)
    if args.mode == "text":
        modes.text(run, args.prompt, settings, args.out, pixels=pixels, seed=args.seed)
    elif args.mode == "image":
        modes.image(run, args.prompt, settings, args.out, pixels=pixels, seed=args.seed, progress=not args.no_progress)
    elif args.mode == "interleaved":
        modes.interleaved(run, args.prompt, settings, args.out, kind=args.layout, max_images=args.max_images,
                          pixels=pixels, seed=args.seed)
    else:
        modes.chat(run, settings, args.out, first=args.prompt, pixels=pixels, seed=args.seed)
    return 0


def cmd_aot(args, extra) -> int:
    # Compile only: the host's own work (shapes, FLOP counts) runs on the CPU, never probing for TPU chips.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dreamjax.train import aot

    config = load_config(args.config, extra)
    return aot.main(config, args.topology)


def cmd_prepare(args, extra) -> int:
    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    from dreamjax.data import prepare as prepare_cmd

    return prepare_cmd.main(args)


def cmd_demo(args, extra) -> int:
    """Train configs/tiny.py on the shapes world, then measure and write samples."""
    from dreamjax.eval.demo import evaluate
    from dreamjax.run.assembly import load_run
    from dreamjax.train.loop import train

    config_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    config = load_config(args.config or config_path, extra)
    t0 = time.time()
    metrics = train(config, args.workdir, progress=not args.no_progress, sampler=_sampler())
    t_train = time.time() - t0
    log.info("training took %.0f s (final loss %.4f)", t_train, metrics.get("loss", float("nan")))
    run = load_run(args.workdir)
    out_dir = os.path.join(args.workdir, "samples")
    scores = evaluate(run, out_dir, n=args.num_eval)
    print(f"train_seconds={t_train:.0f}")
    print(f"samples written to {out_dir}")
    print(f"color_accuracy={scores['color_accuracy']:.2f}")
    print(f"vqa_accuracy={scores['vqa_accuracy']:.2f}")
    print(f"story: {os.path.join(out_dir, 'story', 'index.html')} ({scores['story_images']} images, "
          f"{scores['story_color_matches']} in the colour their text names)")
    return 0


def _base_config(overrides: list[str]) -> ConfigDict:
    """configs/common.py's `base_config()`, the defaults every experiment config starts from."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "common.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass --config PATH[:ARG] to base the imported run on")
    spec = importlib.util.spec_from_file_location("_dreamjax_common_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.base_config()
    for item in overrides:
        apply_override(config, item)
    return config


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("BIGMK") or "0"
    unit = text.strip().upper()[len(number):]
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 2GiB") from None


def cmd_import(args, extra) -> int:
    from dreamjax.run.interop import import_checkpoint

    base = load_config(args.config, extra) if args.config else _base_config(extra)
    summary = import_checkpoint(args.format, args.src, args.out, base, seed=args.seed)
    print(f"imported {summary['format']} ({summary['parameters']:,} parameters: {', '.join(summary['parts'])}; "
          f"precision {summary['precision']}) into {summary['out']}")
    return 0


def cmd_export(args, extra) -> int:
    from dreamjax.run.interop import export_checkpoint

    if extra:
        raise ValueError(f"unrecognised arguments: {' '.join(extra)}")
    result = export_checkpoint(args.format, args.checkpoint, args.out, step=args.step,
                               max_shard_bytes=parse_size(args.max_shard_size))
    for note in result["notes"]:
        print(f"left out {note}")
    print(f"exported step {result['step']} as {result['format']} into {result['out']}")
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

    g = sub.add_parser("generate", help="text, images, interleaved documents or a chat from a trained workdir",
                       description="Sampling defaults are the run's own (its config's `sample` section).")
    g.add_argument("--checkpoint", required=True, help="a `dreamjax train` workdir")
    g.add_argument("--prompt", default=None, help="the prompt (chat: the first message; optional)")
    g.add_argument("--mode", choices=("text", "image", "interleaved", "chat"), default="text")
    g.add_argument("--out", required=True, help="output folder: output.json, PNGs, index.html + document.md")
    g.add_argument("--layout", choices=("document", "instruction"), default="document",
                   help="interleaved: continue a document opening (MMC4 layout) or follow an instruction")
    g.add_argument("--max-images", type=int, default=4, help="interleaved: most images in the document")
    g.add_argument("--steps", type=int, default=None, help="diffusion sampling steps")
    g.add_argument("--guidance", type=float, default=None, help="CFG scale")
    g.add_argument("--sampler", choices=("ddpm", "ddim"), default=None)
    g.add_argument("--negative-prompt", default=None, help="\"\": the readout after BOS")
    g.add_argument("--num-images", type=int, default=None, help="images per prompt (candidates with --rerank)")
    g.add_argument("--rerank", default=None, metavar="CLIP_DIR",
                   help="keep the best of --num-images by CLIP score (a local transformers CLIPModel directory)")
    g.add_argument("--temperature", type=float, default=None, help="0: greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--mesh", default=None,
                   help="mesh axis overrides, e.g. data=1,fsdp=-1 (default: the run's config.mesh)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--image", action="append", help="input image file (repeatable)")
    g.add_argument("--no-progress", action="store_true")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("import", help="a PyTorch checkpoint (local directory) into a dreamjax workdir",
                       description="hf-llama: a transformers Llama directory (text generation on its own); clip: a "
                                   "transformers CLIP directory (its vision tower); diffusers-sd: a diffusers Stable "
                                   "Diffusion directory (unet/, vae/, scheduler/); dreamllm: the released DreamLLM "
                                   "layout. Overrides: --config.key=value.")
    i.add_argument("format", choices=("hf-llama", "clip", "diffusers-sd", "dreamllm"))
    i.add_argument("--src", required=True, help="the local directory to import (never a hub id)")
    i.add_argument("--out", required=True, help="the new workdir (must not exist or be empty)")
    i.add_argument("--config", default=None, help="PATH[:ARG] of the config to base the run on "
                                                   "(default: configs/common.py)")
    i.add_argument("--seed", type=int, default=0, help="init of rows the source lacks (new special tokens)")
    i.set_defaults(func=cmd_import)

    e = sub.add_parser("export", help="a dreamjax workdir's weights as PyTorch directories",
                       description="hf: llm/ (LlamaForCausalLM), vision/ (CLIPVisionModel), unet/ vae/ scheduler/ "
                                   "(diffusers) and dreamllm_heads.safetensors; dreamllm: the released DreamLLM "
                                   "layout that upstream's code loads.")
    e.add_argument("format", choices=("hf", "dreamllm"))
    e.add_argument("--checkpoint", required=True, help="a dreamjax workdir")
    e.add_argument("--out", required=True, help="the new directory (must not exist or be empty)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    e.set_defaults(func=cmd_export)

    a = sub.add_parser("aot", help="compile the train step for a TPU slice on this machine: memory per chip, FLOPs",
                       description="Needs the TPU compiler (`make aot` installs it). Overrides: --config.key=value.")
    a.add_argument("--config", required=True, help="PATH[:ARG], e.g. configs/dreamllm_7b.py:stage2")
    a.add_argument("--topology", required=True, help="a Cloud TPU slice: v5p-128, v5e-256, v4-256, 2xv5p-128, ...")
    a.set_defaults(func=cmd_aot)

    from dreamjax.eval import commands as eval_commands  # light: no JAX backend starts

    ev = sub.add_parser("eval", help="benchmarks: VQAv2 accuracy, COCO captions, CLIP score, FID")
    eval_commands.add_arguments(ev)
    ev.set_defaults(func=eval_commands.main)

    pr = sub.add_parser("prepare", help="raw MMC4 / WebDataset / pairs / LLaVA files into ArrayRecord shards",
                        description="One command per data set; see README 'Prepare your data'.")
    from dreamjax.data import prepare as prepare_cmd  # light: no JAX backend starts

    prepare_cmd.add_arguments(pr)
    pr.set_defaults(func=cmd_prepare)

    d = sub.add_parser("demo", help="train the tiny config on the shapes world and report two skills")
    d.add_argument("--workdir", default="workdirs/demo")
    d.add_argument("--config", default=None, help="default: configs/tiny.py")
    d.add_argument("--num-eval", type=int, default=64)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def entry() -> int:
    """The `dreamjax` console script: `main` in a process that runs with malloc's huge pages (runtime.py)."""
    runtime.rerun_with_huge_pages()
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax reports expected partial restores as warnings
    runtime.keep_freed_memory()  # XLA:CPU's large temporaries reuse heap pages (dreamjax/runtime.py)
    try:
        return args.func(args, extra)
    except USER_ERRORS as e:
        if os.environ.get("DREAMJAX_DEBUG"):
            raise
        # one line whatever the message: a library's (transformers' tokenizer loading, say) may span several
        print(f"dreamjax {args.command}: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(entry())
