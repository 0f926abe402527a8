"""Weight-name tables and the one generic mapper between PyTorch state dicts and Flax trees.

A model's conversion is a list of `Rule`s: a PyTorch key template and a Flax path template.
Templates may hold integer placeholders such as ``{i}``:

    Rule("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/q_proj/kernel")

- A placeholder present on both sides is substituted (``down_blocks.{b}`` -> ``down_blocks_{b}``).
- A placeholder present only on the torch side means the Flax tree *stacks* those tensors on a new
  leading axis, in index order (this is how `nn.scan`-ed layers are stored).

Transforms are limited to transposes (``kind="kernel"``: a Linear ``[out, in]`` becomes a Dense
``[in, out]``; a Conv ``[O, I, H, W]`` becomes ``[H, W, I, O]``) and dropping a leading axis of 1
(``kind="squeeze0"``: upstream's ``dream_queries`` ``[1, Q, D]`` is ``[Q, D]`` here), so a round trip is
bit-exact and dtypes (bf16 included) are preserved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class ConversionError(ValueError):
    """Raised with one clear message naming the offending keys."""


# identity: the same array; kernel: Linear / Conv weights transposed; squeeze0: torch keeps a leading axis of 1
KINDS = ("identity", "kernel", "squeeze0")


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    flax: str
    kind: str = "identity"  # one of KINDS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Rule kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def torch_vars(self) -> list[str]:
        return _PLACEHOLDER.findall(self.torch)

    @property
    def flax_vars(self) -> list[str]:
        return _PLACEHOLDER.findall(self.flax)

    @property
    def stacked_var(self) -> str | None:
        extra = [v for v in self.torch_vars if v not in self.flax_vars]
        if len(extra) > 1:
            raise ValueError(f"Rule {self.torch!r} stacks more than one placeholder: {extra}")
        return extra[0] if extra else None


def _template_regex(template: str, sep: str) -> re.Pattern:
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        parts.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$")


def _to_flax_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel":
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    if kind == "squeeze0":
        if x.ndim == 0 or x.shape[0] != 1:
            raise ConversionError(f"expected a leading axis of 1, got shape {tuple(x.shape)}")
        return x[0]
    return x


def _to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel":
        if x.ndim == 2:
            return np.ascontiguousarray(x.T)
        if x.ndim == 4:
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    if kind == "squeeze0":
        return x[None]
    return x


def flax_shape(shape: Sequence[int], kind: str) -> tuple[int, ...]:
    """The Flax-layout shape of a torch tensor of `shape` under a rule of `kind` (no data touched).
    A squeeze0 tensor without its leading 1 keeps its shape, so the shape check reports it."""
    shape = tuple(shape)
    if kind == "kernel" and len(shape) == 2:
        return shape[::-1]
    if kind == "kernel" and len(shape) == 4:
        o, i, h, w = shape
        return (h, w, i, o)
    if kind == "squeeze0" and shape[:1] == (1,):
        return shape[1:]
    return shape


def torch_shape(shape: Sequence[int], kind: str) -> tuple[int, ...]:
    """The inverse of `flax_shape`: the torch-layout shape of a Flax array of `shape`."""
    shape = tuple(shape)
    if kind == "kernel" and len(shape) == 2:
        return shape[::-1]
    if kind == "kernel" and len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    if kind == "squeeze0":
        return (1, *shape)
    return shape


# ----------------------------------------------------------------------------- tree helpers


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- tensors


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (any dtype, bf16 included) or array -> numpy, bit-exact."""
    if isinstance(t, np.ndarray):
        return t
    mod = type(t).__module__
    if mod.startswith("torch"):
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def to_torch(x: Any):
    """numpy (bf16 included) -> torch tensor, bit-exact."""
    import ml_dtypes
    import torch

    x = np.asarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


# ----------------------------------------------------------------------------- mapping


def plan_keys(keys: Iterable[str], rules: Sequence[Rule], *, ignore: Sequence[str] = (),
              what: str = "state dict") -> dict[str, dict]:
    """Which torch keys make which Flax parameter, from the names alone (nothing is read):
    {flax path: {"kind": rule kind, "single": key}} or {..., "stack": {layer index: key}} for a parameter
    that stacks a placeholder (scanned layers). A key no rule maps and no `ignore` regex drops raises."""
    compiled = [(r, _template_regex(r.torch, ".")) for r in rules]
    ignore_re = [re.compile(p) for p in ignore]
    plan: dict[str, dict] = {}
    unexpected = []
    for key in keys:
        for rule, rx in compiled:
            m = rx.match(key)
            if m is None:
                continue
            groups = {k: int(v) for k, v in m.groupdict().items()}
            sv = rule.stacked_var
            path = rule.flax.format(**{k: v for k, v in groups.items() if k != sv})
            entry = plan.setdefault(path, {"kind": rule.kind})
            if sv is None:
                entry["single"] = key
            else:
                entry.setdefault("stack", {})[groups[sv]] = key
            break
        else:
            if not any(p.search(key) for p in ignore_re):
                unexpected.append(key)
    if unexpected:
        raise ConversionError(f"{what}: unexpected keys (no rule maps them): {_fmt_keys(unexpected)}")
    return plan


def torch_to_flax(
    state_dict: Mapping[str, Any],
    rules: Sequence[Rule],
    *,
    ignore: Sequence[str] = (),
    expected: Mapping[str, Any] | None = None,
    what: str = "state dict",
) -> dict[str, Any]:
    """Map a PyTorch state dict onto a nested Flax parameter dict.

    ignore: regexes of torch keys that are dropped on purpose (buffers such as ``inv_freq``).
    expected: a Flax tree (arrays or ShapeDtypeStructs) to check completeness and shapes against.
    Raises ConversionError naming every unexpected, missing or misshapen key.
    """
    flat = {}
    for path, entry in plan_keys(state_dict.keys(), rules, ignore=ignore, what=what).items():
        kind = entry["kind"]
        if "single" in entry:
            flat[path] = _to_flax_layout(to_numpy(state_dict[entry["single"]]), kind)
            continue
        idx = sorted(entry["stack"])
        if idx != list(range(len(idx))):
            missing = sorted(set(range(max(idx) + 1)) - set(idx))
            raise ConversionError(f"{what}: stacked parameter {path!r} is missing layer indices {missing}")
        flat[path] = np.stack([_to_flax_layout(to_numpy(state_dict[entry["stack"][i]]), kind) for i in idx])
    if expected is not None:
        _check_against(flat, expected, rules, what)
    return unflatten(flat)


def _check_against(flat: Mapping[str, Any], expected: Mapping[str, Any], rules, what: str) -> None:
    exp = flatten(expected)
    missing = sorted(set(exp) - set(flat))
    extra = sorted(set(flat) - set(exp))
    if missing:
        names = [_torch_name_for(p, rules) for p in missing]
        raise ConversionError(f"{what}: missing keys: {_fmt_keys(names)}")
    if extra:
        raise ConversionError(f"{what}: keys the model does not have: {_fmt_keys(extra)}")
    bad = [
        f"{p} {tuple(flat[p].shape)} != {tuple(exp[p].shape)}"
        for p in exp
        if tuple(flat[p].shape) != tuple(exp[p].shape)
    ]
    if bad:
        raise ConversionError(f"{what}: shape mismatch: {_fmt_keys(bad)}")


def _torch_name_for(flax_path: str, rules: Sequence[Rule]) -> str:
    for rule in rules:
        m = _template_regex(rule.flax, "/").match(flax_path)
        if m:
            vals = {k: int(v) for k, v in m.groupdict().items()}
            if rule.stacked_var:
                vals[rule.stacked_var] = "*"  # type: ignore[assignment]
            return rule.torch.format(**vals)
    return flax_path


def plan_paths(shapes: Mapping[str, tuple[int, ...]], rules: Sequence[Rule], *,
               what: str = "params") -> dict[str, tuple[Rule, tuple[str, ...]]]:
    """Which torch keys each Flax parameter becomes, from names and shapes alone (nothing is read):
    {flax path: (rule, torch keys)}, in path order; a stacked (scanned) parameter makes one key per layer.
    A path no rule maps raises, naming it. The inverse of `plan_keys`."""
    compiled = [(r, _template_regex(r.flax, "/")) for r in rules]
    out: dict[str, tuple[Rule, tuple[str, ...]]] = {}
    unmapped = []
    for path in sorted(shapes):
        for rule, rx in compiled:
            m = rx.match(path)
            if m is None:
                continue
            groups = {k: int(v) for k, v in m.groupdict().items()}
            sv = rule.stacked_var
            if sv is None:
                out[path] = (rule, (rule.torch.format(**groups),))
            else:
                out[path] = (rule, tuple(rule.torch.format(**groups, **{sv: i}) for i in range(shapes[path][0])))
            break
        else:
            unmapped.append(path)
    if unmapped:
        raise ConversionError(f"{what}: no rule maps these Flax parameters: {_fmt_keys(unmapped)}")
    return out


def flax_to_torch(params: Mapping[str, Any], rules: Sequence[Rule], *, what: str = "params") -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: a nested Flax dict -> {torch key: numpy array (torch layout)}."""
    flat = flatten(params)
    out: dict[str, np.ndarray] = {}
    for path, (rule, keys) in plan_paths({p: np.shape(v) for p, v in flat.items()}, rules, what=what).items():
        arr = np.asarray(flat[path])
        if rule.stacked_var is None:
            out[keys[0]] = _to_torch_layout(arr, rule.kind)
        else:
            for i, key in enumerate(keys):
                out[key] = _to_torch_layout(arr[i], rule.kind)
    return out


def prefixed(rules: Sequence[Rule], torch_prefix: str = "", flax_prefix: str = "") -> list[Rule]:
    """The same rules under a torch key prefix and/or a Flax path prefix."""
    fp = flax_prefix.rstrip("/") + "/" if flax_prefix else ""
    return [dataclasses.replace(r, torch=torch_prefix + r.torch, flax=fp + r.flax) for r in rules]


# ----------------------------------------------------------------------------- files


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Load a state dict from a .safetensors / .bin / .pt file, or a directory holding one
    (sharded checkpoints with an ``*.index.json`` included). Tensors stay torch tensors for .bin
    files and become numpy arrays for safetensors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint path does not exist: {path}")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for index_name in ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                           "pytorch_model.bin.index.json", "diffusion_pytorch_model.bin.index.json"):
            if index_name in names:
                with open(os.path.join(path, index_name)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                sd: dict[str, Any] = {}
                for shard in shards:
                    sd.update(load_state_dict(os.path.join(path, shard)))
                return sd
        for cand in ("model.safetensors", "diffusion_pytorch_model.safetensors",
                     "pytorch_model.bin", "diffusion_pytorch_model.bin"):
            if cand in names:
                return load_state_dict(os.path.join(path, cand))
        raise ConversionError(
            f"no weights file in {path} (looked for *.safetensors, *.bin and their .index.json); found: "
            f"{_fmt_keys(names) or 'nothing'}"
        )
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
    if path.endswith((".bin", ".pt", ".pth")):
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"reading {path} needs torch: pip install 'dreamjax[torch]'") from e
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"cannot read torch checkpoint {path}: {e}") from e
        if not isinstance(sd, Mapping):
            raise ConversionError(f"{path} does not hold a state dict (got {type(sd).__name__})")
        return dict(sd)
    raise ConversionError(f"unknown checkpoint file type (want .safetensors, .bin, .pt): {path}")


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.fspath(path))
