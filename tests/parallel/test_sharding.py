"""Sharded == unsharded: one step's loss and gradients on several meshes equal the single-device values."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign.config import ConfigError, MeshConfig
from jaxalign.models.transformer import init_model
from jaxalign.parallel.mesh import make_mesh, mesh_shape
from jaxalign.stages import pretrain
from tests.helpers import lm_batch, rules_for, tiny


def loss_and_grads(cfg, rules, batch):
    graphdef, params = init_model(cfg, rules, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    batch_sharding = rules.sharding(("batch", "length"))
    loss = functools.partial(pretrain.loss_fn, graphdef=graphdef, z_loss=1e-4)

    @functools.partial(jax.jit, in_shardings=(shardings, batch_sharding), out_shardings=(None, shardings))
    def step(params, batch):
        (loss_sum, (weight, _)), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        return loss_sum / weight, jax.tree.map(lambda g: g / weight, grads)

    loss_value, grads = step(params, batch)
    return params, loss_value, grads


@pytest.fixture(scope="module")
def reference():
    cfg = tiny()
    batch = lm_batch(np.random.default_rng(0), batch=8, length=32, vocab=cfg.vocab_size)
    _, loss, grads = loss_and_grads(cfg, rules_for(devices=1), batch)
    return cfg, batch, loss, grads


@pytest.mark.parametrize(
    "mesh", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=8), dict(data=2, fsdp=1, tensor=4)]
)
def test_sharded_step_equals_single_device(reference, mesh):
    cfg, batch, ref_loss, ref_grads = reference
    rules = rules_for(**mesh)
    params, loss, grads = loss_and_grads(cfg, rules, batch)

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree.leaves(grads)
    for (path, g_ref), g in zip(flat_ref, flat, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))

    # The parameters really are laid out as the rules say.
    sizes = rules.mesh.shape
    fsdp = "fsdp" if sizes["fsdp"] > 1 else None
    tensor = "tensor" if sizes["tensor"] > 1 else None
    block = params["blocks"][0]
    assert block["mlp"]["w_gate"][...].sharding.spec == P(fsdp, tensor)
    assert block["mlp"]["w_down"][...].sharding.spec == P(tensor, fsdp)
    assert block["attn"]["wk"][...].sharding.spec == P(fsdp, tensor)
    assert params["embed"][...].sharding.spec == P(tensor, fsdp)
    assert block["attn_norm"]["scale"][...].sharding.spec == P(None)
    # Each device holds only its shard.
    w = block["mlp"]["w_gate"][...]
    shard_shape = w.addressable_shards[0].data.shape
    assert shard_shape == (64 // (sizes["fsdp"]), 128 // (sizes["tensor"]))


def test_scanned_layers_shard_with_a_leading_layer_axis():
    rules = rules_for(data=2, fsdp=2, tensor=2)
    _, params = init_model(tiny(scan_layers=True), rules, seed=0)
    w = params["blocks"]["mlp"]["w_up"][...]
    assert w.shape == (2, 64, 128)
    assert w.sharding.spec == P(None, "fsdp", "tensor")


def test_mesh_sizes_must_multiply_to_the_device_count():
    with pytest.raises(ConfigError, match="multiply to 6, but there are 8 devices"):
        mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="8 is not divisible by 3"):
        make_mesh(MeshConfig(data=3, fsdp=-1))
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == dict(data=2, fsdp=2, tensor=2, stage=1)


def test_unknown_logical_axis_raises():
    rules = rules_for(fsdp=8)
    with pytest.raises(ConfigError, match="logical axis 'experts' has no entry"):
        rules.spec(("experts", "embed"))
