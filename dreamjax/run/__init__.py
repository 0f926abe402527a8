"""Run assembly: a config (a new run) or a workdir (a trained run) -> a ready `Run`
(`dreamjax.run.assembly`). Below train/, infer/, eval/ and cli.py; above data/, models/, diffusion/,
convert/ and parallel/. Import the submodules directly (this package file stays empty so that they can
import each other)."""
