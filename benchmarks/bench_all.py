"""`make bench`: every CPU benchmark in sequence, then a summary of their ratios.

    .venv/bin/python benchmarks/bench_all.py               # all of them (~16 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_all.py --only decode,train_step
    .venv/bin/python benchmarks/bench_all.py --dry-run     # print the command lines only

Each benchmark runs in its own process with the options below (chosen so that the whole run stays under 20
minutes on 2 cores; every script's own defaults are documented in benchmarks/README.md), its output streamed
as it comes. The summary repeats every line that states a ratio, speed-up, goal, memory bound or throughput,
and the wall time of each benchmark. A failing benchmark does not stop the others; the exit status is then 1.
`benchmarks/gpu_train_step.py` needs a GPU and is not part of this (`make bench-gpu`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, script and options, rough minutes on 2 idle cores)
BENCHMARKS = (
    ("models", ["benchmarks/run_all.py", "--budget", "5"], 4.5),  # LLaMA / CLIP / UNet fwd, fwd+bwd, torch.compile
    ("train_step", ["benchmarks/train_step.py", "--budget", "20"], 4.0),  # the whole DreamLLM step, torch.compile
    ("decode", ["benchmarks/decode.py"], 1.0),
    ("text_to_image", ["benchmarks/text_to_image.py", "--reps", "3"], 2.5),
    ("data_pipeline", ["benchmarks/data_pipeline.py"], 2.0),
    ("convert_memory", ["benchmarks/convert_memory.py"], 2.0),
)
SUMMARY = re.compile(r"speed-up|ratio|goal|peak/model|documents/s|non-padding|tokens/s|FLOP/s|rel err|load average|"
                     r"WARNING|^total|^llama/|^clip/|^unet/|^ddim|^ddpm|^  (dreamjax|torch)|first step", re.I)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [n for n, _, _ in BENCHMARKS]
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(names)}")
    p.add_argument("--dry-run", action="store_true", help="print the command lines and the time estimate only")
    args = p.parse_args(argv)
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown or not chosen:
        p.error(f"--only: unknown benchmark(s) {unknown}; choose from {', '.join(names)}")
    runs = [(n, cmd, est) for n, cmd, est in BENCHMARKS if n in chosen]
    print(f"{len(runs)} benchmarks, about {sum(e for _, _, e in runs):.0f} min on 2 idle cores; load average (1 min) "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    for name, cmd, est in runs:
        print(f"  {name:<15} ~{est:>4.1f} min  {sys.executable} {' '.join(cmd)}")
    if args.dry_run:
        return 0

    summary: list[tuple[str, float, int, list[str]]] = []
    t_all = time.perf_counter()
    for name, cmd, _ in runs:
        print(f"\n===== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        lines = []
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if SUMMARY.search(line) and not line.startswith("W1"):  # not torch's warning log lines
                lines.append(line.rstrip())
        rc = proc.wait()
        summary.append((name, time.perf_counter() - t0, rc, lines))

    print("\n===== summary")
    for name, seconds, rc, lines in summary:
        print(f"--- {name}: {seconds / 60:.1f} min" + ("" if rc == 0 else f", FAILED (exit {rc})"))
        for line in lines:
            print(f"  {line}")
    print(f"all benchmarks: {(time.perf_counter() - t_all) / 60:.1f} min")
    return 0 if all(rc == 0 for _, _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
