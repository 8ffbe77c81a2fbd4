"""LoRA on the NNX model (`jaxalign.peft.lora`): a fresh adapter (b = 0) gives exactly the base logits, merged ==
unmerged, a training step changes only adapter leaves (and the optimizer holds only them), adapters are sharded by
their base weight's logical axes, dropout only under `training`, and one-line config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import LoraConfig, OptimConfig
from jaxalign.errors import ConfigError
from jaxalign.models.transformer import init_model
from jaxalign.peft import lora
from jaxalign.stages import sft
from jaxalign.train import state as state_lib
from tests.helpers import lm_batch, rules_for, tiny

MODEL = tiny(vocab_size=128, n_layers=2)


def _randomise_adapters(params, seed=3):
    """Adapters with non-zero b (as after training)."""
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(params)):
        if isinstance(var, lora.LoraParam):
            var = var.replace(0.05 * jax.random.normal(jax.random.key(seed + i), var.shape))
        flat.append((path, var))
    return nnx.from_flat_state(flat)


@pytest.fixture(scope="module")
def rules():
    return rules_for(devices=1)


def _logits(model, tokens):
    """The model's logits, jitted (eager NNX calls take a minute on a loaded CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))


@pytest.mark.parametrize("scan,quantize", [(True, "none"), (False, "nf4")])
def test_fresh_adapter_is_the_base_and_merge_is_exact(rules, scan, quantize):
    cfg = dataclasses.replace(MODEL, scan_layers=scan)
    graphdef, params = init_model(cfg, rules, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    base_logits = _logits(nnx.merge(graphdef, params), tokens)
    gd, p = lora.attach(graphdef, params, LoraConfig(rank=4, quantize=quantize), rules, seed=0)
    if quantize == "nf4":
        # The base the adapters sit on is the NF4 one: the float model of the dequantised weights (merging b = 0
        # adds exact zeros), which is within NF4's error of the float base. The two graphs differ (dequantised
        # inside the step or before it), so XLA may round them differently: compared to float tolerance.
        nf4_base = _logits(lora.merge(nnx.merge(gd, p)), tokens)
        assert 0 < np.max(np.abs(nf4_base - base_logits)) < 0.1 * np.max(np.abs(base_logits))
        np.testing.assert_allclose(_logits(nnx.merge(gd, p), tokens), nf4_base, rtol=1e-5, atol=1e-6)
        base_logits = _logits(nnx.merge(gd, p), tokens)
    else:
        np.testing.assert_array_equal(_logits(nnx.merge(gd, p), tokens), base_logits)
    # Disabled adapters give the base exactly whatever the adapters hold.
    trained = _randomise_adapters(p)
    np.testing.assert_array_equal(_logits(nnx.merge(gd, lora.disabled(trained)), tokens), base_logits)
    unmerged = _logits(nnx.merge(gd, trained), tokens)
    assert np.max(np.abs(unmerged - base_logits)) > 1e-2  # the adapters do change the outputs
    merged_model = lora.merge(nnx.merge(gd, trained))
    assert not lora.adapters(merged_model)
    np.testing.assert_allclose(_logits(merged_model, tokens), unmerged, rtol=1e-5, atol=1e-5)
    if quantize == "none":  # unmerge restores the adapter model up to float rounding
        adapters = lora.adapters(nnx.merge(gd, trained))
        back = lora.unmerge(lora.merge(nnx.merge(gd, trained)), adapters)
        np.testing.assert_allclose(_logits(back, tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_training_step_changes_only_adapters(rules):
    graphdef, params = init_model(MODEL, rules, 0)
    gd, p = lora.attach(graphdef, params, LoraConfig(rank=4, alpha=8, dropout=0.1), rules, seed=0)
    state = state_lib.create(gd, p, OptimConfig(lr=1e-2, warmup_steps=0), 10, 0)
    trainable, frozen = lora.split_trainable(state.params)
    # The optimizer state has Adam moments for the adapters only.
    n_adapter = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * n_adapter, (n_opt, n_adapter)
    batch = lm_batch(np.random.default_rng(0), 4, 32, MODEL.vocab_size)
    step = jax.jit(
        lambda s, b: sft.train_step(s, b, optim=OptimConfig(lr=1e-2, warmup_steps=0), microbatches=2)
    )
    new, metrics = step(state, batch)
    before, after = dict(nnx.to_flat_state(state.params)), dict(nnx.to_flat_state(new.params))
    changed = {"/".join(map(str, k)) for k in before if not np.array_equal(before[k][...], after[k][...])}
    a_paths = {"/".join(map(str, k)) for k, v in before.items() if isinstance(v, lora.LoraParam)}
    b_paths = {k for k in a_paths if k.endswith("/b")}
    assert b_paths <= changed <= a_paths, changed ^ a_paths
    assert np.isfinite(float(metrics["loss"]))


def test_dropout_only_in_training_passes(rules):
    graphdef, params = init_model(MODEL, rules, 0)
    gd, p = lora.attach(graphdef, params, LoraConfig(rank=4, dropout=0.5), rules, seed=0)
    p = _randomise_adapters(p)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, MODEL.vocab_size)
    f = jax.jit(lambda p, t: nnx.merge(gd, p)(t))
    eval_a, eval_b = f(p, tokens), f(p, tokens)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))

    def train_pass(p, t, key):
        with lora.training(key):
            return nnx.merge(gd, p)(t)

    g = jax.jit(train_pass)
    k1, k2 = g(p, tokens, jax.random.key(1)), g(p, tokens, jax.random.key(2))
    assert float(jnp.max(jnp.abs(k1 - k2))) > 1e-3  # masks differ by key
    assert float(jnp.max(jnp.abs(k1 - eval_a))) > 1e-3  # and training differs from evaluation


def test_adapters_follow_the_base_axes():
    rules = rules_for(fsdp=2, tensor=4)
    cfg = dataclasses.replace(MODEL, scan_layers=True)
    graphdef, params = init_model(cfg, rules, 0)
    _, p = lora.attach(graphdef, params, LoraConfig(rank=4), rules, seed=0)
    wq, a, b = (
        p["blocks"]["attn"]["wq"],
        p["blocks"]["attn"]["wq_lora"]["a"],
        p["blocks"]["attn"]["wq_lora"]["b"],
    )
    assert wq.get_metadata()["axes"] == ("layers", "embed", "heads")
    assert a.get_metadata()["axes"] == ("layers", None, "embed")
    assert b.get_metadata()["axes"] == ("layers", "heads", None)
    assert a[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert b[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    # NF4 storage keeps the base's axes too.
    _, q = lora.attach(graphdef, init_model(cfg, rules, 0)[1], LoraConfig(rank=4, quantize="nf4"), rules, 0)
    assert q["blocks"]["mlp"]["w_up"]["codes"][...].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor"
    )


def test_one_line_config_errors(rules):
    graphdef, params = init_model(MODEL, rules, 0)
    with pytest.raises(
        ConfigError,
        match=r"^lora.targets='nothing_here' matches no weight; module paths are: blocks/0/attn/wk, [^\n]*$",
    ):
        lora.attach(graphdef, params, LoraConfig(rank=4, targets="nothing_here"), rules, seed=0)
    with pytest.raises(ConfigError, match=r"lora.quantize='nf4' needs lora.rank > 0 .*got lora.rank=0"):
        LoraConfig(rank=0, quantize="nf4")
    with pytest.raises(ConfigError, match=r"lora.rank=-1 must be >= 0"):
        LoraConfig(rank=-1)
    with pytest.raises(ConfigError, match=r"lora.targets='\(' is not a regular expression"):
        LoraConfig(rank=2, targets="(")
    small = tiny(vocab_size=128, d_model=32, head_dim=8)  # d_model 32: not a whole NF4 block
    g2, p2 = init_model(small, rules, 0)
    with pytest.raises(
        ConfigError,
        match=r"^lora.quantize='nf4': weight blocks/0/attn/w[qkv] has shape \(32, \d+\); its input dimension[^\n]*$",
    ):
        lora.attach(g2, p2, LoraConfig(rank=4, quantize="nf4"), rules, seed=0)
