"""The Pallas kernel inside the model: attention="flash" equals attention="xla", also in the sharded train step."""

import dataclasses
import functools

import jax
import numpy as np

from jaxalign.config import OptimConfig
from jaxalign.models.transformer import init_model
from jaxalign.stages import pretrain
from jaxalign.train import state as state_lib
from tests.helpers import lm_batch, rules_for, tiny

CFG = tiny(n_layers=1, max_seq_len=32)


def step_metrics_and_params(cfg, rules, batch):
    """One real pretraining step (loss, gradients, AdamW update) jitted with the loop's shardings."""
    graphdef, params = init_model(cfg, rules, seed=0)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    state, shardings = state_lib.create_sharded(graphdef, params, optim, 10, 0, rules)
    batch_sharding = rules.sharding(("batch", "length"))
    step = jax.jit(
        functools.partial(pretrain.train_step, optim=optim, z_loss=0.0, microbatches=1),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, None),
    )
    state, metrics = step(state, batch)
    return metrics, state.params


def test_flash_model_loss_and_gradients_equal_xla():
    from tests.parallel.test_sharding import loss_and_grads

    batch = lm_batch(np.random.default_rng(0), batch=4, length=24, vocab=CFG.vocab_size)
    _, ref_loss, ref_grads = loss_and_grads(CFG, rules_for(devices=1), batch)
    _, loss, grads = loss_and_grads(dataclasses.replace(CFG, attention="flash"), rules_for(devices=1), batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Gradients near zero come out of different summation orders: compare relative to each tensor's scale.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max()),
        ref_grads,
        grads,
    )


def test_flash_runs_inside_the_sharded_train_step():
    """Batch over `data`, heads over `tensor`: the kernel runs per shard inside the jitted, donated train step."""
    batch = lm_batch(np.random.default_rng(0), batch=4, length=24, vocab=CFG.vocab_size)
    ref_metrics, _ = step_metrics_and_params(CFG, rules_for(devices=1), batch)
    flash = dataclasses.replace(CFG, attention="flash")
    metrics, params = step_metrics_and_params(flash, rules_for(data=2, fsdp=1, tensor=4), batch)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    assert params["blocks"][0]["attn"]["wq"][...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
