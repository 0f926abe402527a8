"""Mesh construction and logical sharding rules (DESIGN section 4): no compiles, milliseconds.

conftest.py gives 8 host CPU devices.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from dreamjax.parallel.mesh import MESH_AXES, MeshError, make_mesh, resolve_axis_sizes
from dreamjax.parallel.sharding import (
    DEFAULT_RULES,
    FSDP_RULES,
    batch_axes,
    batch_sharding,
    check_batch_divides,
    data_parallel_size,
    logical_sharding,
    rules_from_config,
)


def _shape(mesh):
    return tuple(mesh.shape[a] for a in MESH_AXES)


def test_eight_devices():
    assert len(jax.devices()) == 8, "conftest.py should force 8 host devices"


# ------------------------------------------------------------------------------------------------ make_mesh


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ({"data": -1}, (8, 1, 1)),
        ({"fsdp": -1}, (1, 8, 1)),
        ({"data": 2, "fsdp": -1}, (2, 4, 1)),
        ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 2)),
        ({"data": 2, "fsdp": 2, "tensor": -1}, (2, 2, 2)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ((2, 4, 1), (2, 4, 1)),  # a plain 3-tuple in MESH_AXES order
        ((-1, 1, 4), (2, 1, 4)),
    ],
)
def test_make_mesh_resolves_sizes(sizes, expected):
    mesh = make_mesh(sizes)
    assert mesh.axis_names == MESH_AXES
    assert _shape(mesh) == expected
    assert mesh.devices.size == 8
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_device_subset():
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    assert _shape(mesh) == (1, 1, 1)
    assert list(mesh.devices.flat) == [jax.devices()[0]]
    mesh = make_mesh({"data": -1, "tensor": 2}, devices=jax.devices()[:4])
    assert _shape(mesh) == (2, 1, 2)


@pytest.mark.parametrize(
    "sizes, numbers",
    [
        ({"data": 3}, ["3", "8"]),  # product 3 != 8
        ({"data": 2, "fsdp": 2}, ["4", "8"]),  # product 4 != 8: no silent -1
        ({"data": 4, "fsdp": 4}, ["16", "8"]),  # more than there are
        ({"data": 3, "fsdp": -1}, ["3", "8"]),  # fixed part does not divide
        ({"data": 2, "fsdp": 3, "tensor": -1}, ["6", "8"]),
    ],
)
def test_make_mesh_not_dividing_devices_raises_with_numbers(sizes, numbers):
    with pytest.raises(MeshError) as info:
        make_mesh(sizes)
    msg = str(info.value)
    for n in numbers:
        assert re.search(rf"\b{n}\b", msg), f"{n!r} missing from {msg!r}"
    assert "devices" in msg


def test_mesh_error_is_a_value_error():
    # config validation code may catch ValueError
    assert issubclass(MeshError, ValueError)
    with pytest.raises(ValueError):
        make_mesh({"data": 5})


def test_unknown_axis_names_raise():
    with pytest.raises(MeshError, match="model") as info:
        make_mesh({"data": 2, "model": 4})
    # the message lists the axes that do exist
    for axis in MESH_AXES:
        assert axis in str(info.value)
    with pytest.raises(MeshError, match="sequence"):
        resolve_axis_sizes({"sequence": -1}, 8)


def test_multiple_free_axes_raise():
    with pytest.raises(MeshError, match="-1"):
        make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(MeshError, match="at most one"):
        make_mesh((-1, -1, -1))


@pytest.mark.parametrize("bad", [0, -2])
def test_non_positive_sizes_raise(bad):
    with pytest.raises(MeshError, match=str(bad)):
        make_mesh({"data": bad, "fsdp": -1})


def test_resolve_axis_sizes_without_devices():
    assert resolve_axis_sizes({"data": -1, "tensor": 4}, 256) == (64, 1, 4)
    assert resolve_axis_sizes({}, 1) == (1, 1, 1)
    with pytest.raises(MeshError, match="dcn mesh"):
        resolve_axis_sizes({"data": 3}, 2, what="dcn mesh")


# ------------------------------------------------------------------------------------------------ rules


def test_default_rules_map_batch_over_data_and_fsdp():
    def axes(*names, rules=DEFAULT_RULES):
        return tuple(nn.logical_to_mesh_axes(names, rules))

    assert axes("batch") == (("data", "fsdp"),)
    assert batch_axes(DEFAULT_RULES) == ("data", "fsdp")
    assert axes("embed") == ("fsdp",)
    for name in ("heads", "mlp", "vocab"):
        assert axes("embed", name) == ("fsdp", "tensor"), name
        assert axes(name, "embed") == ("tensor", "fsdp"), name
        assert axes(name) == ("tensor",), name
        # pure FSDP: the kernel's 'embed' takes 'fsdp'; a bias with no 'embed' falls back to 'fsdp'
        assert axes("embed", name, rules=FSDP_RULES) == ("fsdp", None), name
        assert axes(name, rules=FSDP_RULES) == ("fsdp",), name
    # DreamLLM's projectors and queries: the LLM width wins 'fsdp', wherever it is in the weight
    assert axes("vision_embed", "embed") == (None, "fsdp")
    assert axes("embed", "cross_embed") == ("fsdp", None)
    assert axes("queries", "embed") == (None, "fsdp")
    # conv kernels: output channels; input channels only without an output-channel / embed dimension
    assert axes("conv_height", "conv_width", "conv_in", "conv_out") == (None, None, None, "fsdp")
    assert axes("conv_in", "embed") == (None, "fsdp")
    assert axes("conv_in", "mlp") == ("fsdp", "tensor")
    assert axes("layers", "embed", "mlp") == (None, "fsdp", "tensor")
    # every rule targets a real mesh axis
    for name, axes in DEFAULT_RULES:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        assert set(names) <= set(MESH_AXES), (name, axes)


def test_rules_from_config():
    assert rules_from_config(None) == tuple(DEFAULT_RULES)
    assert rules_from_config([["batch", ["data"]], ["embed", None], ["mlp", "tensor"]]) == (
        ("batch", ("data",)), ("embed", None), ("mlp", "tensor"))


@pytest.mark.parametrize(
    "sizes, dp",
    [((8, 1, 1), 8), ((2, 4, 1), 8), ((1, 4, 2), 4), ((2, 2, 2), 4), ((1, 1, 8), 1)],
)
def test_data_parallel_size_and_batch_sharding(sizes, dp):
    mesh = make_mesh(sizes)
    assert data_parallel_size(mesh, DEFAULT_RULES) == dp
    sh = batch_sharding(mesh, DEFAULT_RULES, 5)
    assert sh.spec == PartitionSpec(("data", "fsdp"), None, None, None, None)
    x = jax.device_put(jnp.zeros((8, 3)), batch_sharding(mesh, DEFAULT_RULES, 2))
    assert x.addressable_shards[0].data.shape == (8 // dp, 3)


def test_check_batch_divides():
    mesh = make_mesh((2, 2, 2))
    check_batch_divides(8, mesh, DEFAULT_RULES)
    check_batch_divides(4, mesh, DEFAULT_RULES)
    with pytest.raises(ValueError) as info:
        check_batch_divides(6, mesh, DEFAULT_RULES)
    msg = str(info.value)
    assert "6" in msg and "4-way" in msg and "multiple of 4" in msg
    assert "data" in msg and "fsdp" in msg  # says which axes carry the batch
    with pytest.raises(ValueError, match=r"\b12\b.*\b8-way"):
        check_batch_divides(12, make_mesh({"data": -1}), DEFAULT_RULES)
    # no batch rule: no data parallelism, every batch size divides
    check_batch_divides(3, mesh, [("batch", None)])


def _boxed(shape, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_logical_sharding_maps_names_and_replicates_what_does_not_divide():
    mesh = make_mesh((2, 2, 2))  # data, fsdp, tensor
    tree = {
        "embed_tokens": _boxed((10, 32), ("vocab", "embed")),  # vocab 10 % 2 == 0, embed 32 % 2 == 0
        "odd_vocab": _boxed((7, 32), ("vocab", "embed")),  # 7 is not divisible by tensor=2
        "odd_embed": _boxed((8, 5), ("mlp", "embed")),  # 5 is not divisible by fsdp=2
        "qkv": _boxed((32, 4, 8), ("embed", "heads", "head_dim")),
        "stacked": _boxed((3, 32, 16), ("layers", "embed", "mlp")),
        "conv": _boxed((3, 3, 8, 16), ("conv_height", "conv_width", "conv_in", "conv_out")),
        "unnamed": jax.ShapeDtypeStruct((4, 4), jnp.float32),
        "scalar": jax.ShapeDtypeStruct((), jnp.float32),
    }
    sh = logical_sharding(tree, mesh, DEFAULT_RULES)
    for v in jax.tree.leaves(sh):
        assert isinstance(v, NamedSharding) and v.mesh == mesh
    spec = {k: tuple(v.spec) + (None,) * (len(getattr(nn.meta.unbox(tree[k]), "shape", ())) - len(v.spec))
            for k, v in sh.items()}
    assert spec["embed_tokens"] == ("tensor", "fsdp")
    assert spec["odd_vocab"] == (None, "fsdp")
    assert spec["odd_embed"] == ("tensor", None)
    assert spec["qkv"] == ("fsdp", "tensor", None)
    assert spec["stacked"] == (None, "fsdp", "tensor")
    assert spec["conv"] == (None, None, None, "fsdp")
    assert spec["unnamed"] == (None, None)
    assert spec["scalar"] == ()
    # the shardings are usable as they are
    x = jax.device_put(jnp.zeros((7, 32)), sh["odd_vocab"])
    assert x.addressable_shards[0].data.shape == (7, 16)


def test_logical_sharding_multi_axis_rule_replicates_unless_the_product_divides():
    mesh = make_mesh((2, 2, 2))
    tree = {"ok": _boxed((8, 3), ("batch", None)), "bad": _boxed((6, 3), ("batch", None))}
    sh = logical_sharding(tree, mesh, DEFAULT_RULES)
    assert sh["ok"].spec[0] == ("data", "fsdp")
    # 6 is divisible by data=2 but not by data*fsdp=4: the whole dimension is replicated
    assert sh["bad"].spec[0] is None


def test_a_dimension_that_does_not_divide_moves_its_axes_or_is_replicated_and_says_so(caplog):
    caplog.set_level("INFO", logger="dreamjax.parallel.sharding")
    mesh = make_mesh((1, 8, 1))
    tree = {"conv_out": _boxed((3, 3, 320, 4), ("conv_height", "conv_width", "conv_in", "conv_out")),
            "tiny": _boxed((3,), ("norm",))}
    for _ in range(3):  # called several times a run: each fix is reported once
        sh = logical_sharding(tree, mesh, DEFAULT_RULES)
    assert tuple(sh["conv_out"].spec) == (None, None, "fsdp", None)  # the 320 input channels take fsdp
    assert tuple(sh["tiny"].spec) == (None,)
    moved = [r.getMessage() for r in caplog.records if "conv_out" in r.getMessage()]
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sharding tiny")]
    assert len(moved) == 1, moved
    assert moved[0].startswith("sharding conv_out: dim 3 (conv_out) of shape (3, 3, 320, 4) (logical axes "
                               "('conv_height', 'conv_width', 'conv_in', 'conv_out')) is not divisible by mesh axes "
                               "fsdp (size 8 of mesh {'data': 1, 'fsdp': 8, 'tensor': 1})"), moved[0]
    assert moved[0].endswith("; sharding dim 2 (320) over fsdp instead"), moved[0]
    assert len(kept) == 1 and "(logical axes ('norm',))" in kept[0] and kept[0].endswith("replicated over fsdp")
    assert all(r.levelname == "INFO" for r in caplog.records)


def test_the_replication_log_names_nested_parameter_paths_once_per_path_and_reason(caplog):
    caplog.set_level("INFO", logger="dreamjax.parallel.sharding")
    tree = {"blocks": [{"bias": _boxed((3,), ("mlp",))}, {"bias": _boxed((3,), ("mlp",))}]}
    for mesh in (make_mesh((1, 8, 1)), make_mesh((1, 8, 1)), make_mesh((1, 4, 2))):
        logical_sharding(tree, mesh, DEFAULT_RULES)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sharding blocks/")]
    # two paths x two reasons (fsdp size 8 on the (1, 8, 1) mesh; tensor size 2 on the (1, 4, 2) mesh)
    assert sorted(m.split(":")[0] for m in messages) == ["sharding blocks/0/bias"] * 2 + ["sharding blocks/1/bias"] * 2
    assert sum("mesh axes fsdp (size 8" in m for m in messages) == 2
    assert sum("mesh axes tensor (size 2" in m for m in messages) == 2


def test_rules_to_size_one_mesh_axes_give_way_to_the_next_rule():
    tree = {"bias": _boxed((16,), ("mlp",)), "kernel": _boxed((8, 16), ("embed", "mlp")),
            "stacked_bias": _boxed((24, 16), ("layers", "heads"))}
    sh = logical_sharding(tree, make_mesh((1, 8, 1)), DEFAULT_RULES)  # no tensor parallelism: 'mlp' -> 'fsdp'
    assert {k: tuple(v.spec) for k, v in sh.items()} == {
        # the kernel's spec is the table's either way (the size-1 'tensor' splits nothing), so it stays as written
        "bias": ("fsdp",), "kernel": ("fsdp", "tensor"), "stacked_bias": (None, "fsdp")}
    assert not any(v.is_fully_replicated for v in sh.values())
    sh = logical_sharding(tree, make_mesh((1, 4, 2)), DEFAULT_RULES)  # with it, as the table says
    assert {k: tuple(v.spec) for k, v in sh.items()} == {
        "bias": ("tensor",), "kernel": ("fsdp", "tensor"), "stacked_bias": (None, "tensor")}
    sh = logical_sharding(tree, make_mesh((8, 1, 1)), DEFAULT_RULES)  # pure data parallelism: all replicated
    assert all(v.is_fully_replicated for v in sh.values())
    # where skipping size-1 axes splits nothing differently, a spec reads as the table writes it on every mesh
    emb = {"embedding": _boxed((32, 16), ("vocab", "embed"))}
    for shape in ((8, 1, 1), (2, 4, 1), (1, 8, 1), (1, 4, 2)):
        assert tuple(logical_sharding(emb, make_mesh(shape), DEFAULT_RULES)["embedding"].spec) == ("tensor", "fsdp")


def test_default_rules_name_every_axis_the_models_use():
    """Every logical axis name in the parameters of every model (DreamLLM with all its towers, and the towers on
    their own in the variants that change the parameter tree: GQA, tied embeddings, unscanned layers, SD 1.x conv
    projections) has a rule."""
    from configs import models
    from dreamjax.models import clip_vision, dreamllm, llama, unet, vae

    toks = dreamllm.SpecialTokenIds(bos=1, im_start=3, im_patch=4, dream_start=5, dream_end=6)
    unet_cfg = {**models.sd21_base_unet(), "block_out_channels": [32, 64, 64, 64],
                "attention_head_dim": [2, 2, 2, 2], "norm_num_groups": 8, "cross_attention_dim": 16,
                "layers_per_block": 1}
    vae_cfg = {**models.sd21_base_vae(), "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4,
               "layers_per_block": 1}
    llm = dict(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2)
    vision = dict(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=28, patch_size=14)
    cfg = dreamllm.build_config(dict(llm=llm, vision=vision, unet=unet_cfg, vae=vae_cfg, num_dream_queries=4),
                                vocab_size=32, tokens=toks)
    key = jax.random.key(0)
    trees = {
        "dreamllm": jax.eval_shape(lambda k: dreamllm.init_params(dreamllm.DreamLLM(cfg), k), key),
        "llama_gqa_tied_unscanned": jax.eval_shape(lambda k: llama.init_params(
            llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, tie_word_embeddings=True, scan_layers=False), k), key),
        "clip_unscanned": jax.eval_shape(lambda k: clip_vision.init_params(
            clip_vision.ClipVisionConfig(**vision, scan_layers=False), k), key),
    }
    sd1 = unet.UNetConfig.from_diffusers({**unet_cfg, "use_linear_projection": False})
    trees["unet_sd1_conv_proj"] = jax.eval_shape(
        lambda: unet.UNet2DCondition(sd1).init(jax.random.PRNGKey(0), *unet.init_inputs(sd1)))
    vae_c = vae.VAEConfig.from_diffusers(vae_cfg)
    trees["vae"] = jax.eval_shape(lambda: vae.AutoencoderKL(vae_c).init(jax.random.PRNGKey(0), vae.init_inputs(vae_c)))

    used: dict[str, set[str]] = {}
    for model, tree in trees.items():
        specs = jax.tree.leaves(nn.get_partition_spec(tree), is_leaf=lambda x: isinstance(x, PartitionSpec))
        assert specs, model
        for spec in specs:
            for a in spec:
                if a is not None:
                    used.setdefault(a, set()).add(model)
    assert {"vision_embed", "queries", "cross_embed", "embed", "kv_heads", "layers", "conv_in", "conv_out",
            "norm"} <= set(used)
    named = {name for name, _ in DEFAULT_RULES}
    missing = {a: sorted(m) for a, m in used.items() if a not in named}
    assert not missing, f"logical axes without a rule (and the models using them): {missing}"


def test_mesh_presets_and_rule_sets():
    from ml_collections import ConfigDict

    from dreamjax.parallel import presets
    from dreamjax.parallel.sharding import RULE_SETS
    from dreamjax.run.assembly import mesh_from_config

    assert (presets.preset("v5p-128").chips, presets.preset("v4-256").chips) == (64, 128)  # TensorCores / 2
    assert (presets.preset("v5e-256").chips, presets.preset("v6e-64").chips) == (256, 64)  # chips
    two = presets.preset("2xv5p-128")
    assert (two.chips, two.dcn, two.rules) == (128, {"data": 2, "fsdp": 1, "tensor": 1}, "dcn_fsdp")
    with pytest.raises(ValueError, match="unknown mesh preset 'v5p-100'"):
        presets.preset("v5p-100")

    def mesh(**kw):
        c = ConfigDict(dict(mesh=dict(preset=None, data=None, fsdp=None, tensor=None, dcn=None, rules=None)))
        c.mesh.update(kw)
        return mesh_from_config(c)

    m, rules = mesh(preset="h100x8")  # the 8 host devices stand in for a GPU node
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1} and rules == FSDP_RULES
    m, _ = mesh(preset="h100x8", tensor=2)  # an axis the config sets overrides the preset; fsdp is the rest
    assert dict(m.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    m, rules = mesh()
    assert dict(m.shape) == {"data": 1, "fsdp": 8, "tensor": 1} and rules == DEFAULT_RULES
    assert nn.logical_to_mesh_axes(("heads",), RULE_SETS["fsdp_tp"]) == PartitionSpec("tensor")
    assert nn.logical_to_mesh_axes(("embed", "heads"), FSDP_RULES) == PartitionSpec("fsdp", None)
    assert "tensor" not in {axes for _, axes in FSDP_RULES}
    with pytest.raises(ValueError, match="config.mesh.preset 'v5p-128' is 64 devices, but this job has 8"):
        mesh(preset="v5p-128")
    with pytest.raises(ValueError, match="unknown rule set 'nope'"):
        mesh(rules="nope")
