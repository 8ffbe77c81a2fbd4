"""EMA of the params (`train.ema_decay`) and checkpoint averaging (`jaxalign.tools.average`).

The EMA after k jitted steps equals the recurrence recomputed in numpy from the per-step params (a skipped step
leaves both unchanged); a pretraining run with an EMA resumes bitwise after SIGKILL (params, optimizer state and
EMA) and evaluates the EMA params (`eval/loss_ema`); the average of saved steps is exactly the element-wise mean and
loads through `model.init_from="ckpt:DIR"` into a model giving the logits of the mean params; `ckpt:PATH#ema` and
the HF export of the EMA give the EMA's logits.
"""

import dataclasses
import functools
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign.config import OptimConfig
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models import hf
from jaxalign.parallel.mesh import Rules
from jaxalign.stages import common, pretrain
from jaxalign.tools import average
from jaxalign.train import state as state_lib
from tests.helpers import lm_batch, random_model, rules_for
from tests.train.test_resume import committed_steps, run

DECAY = 0.75


def _numpy(tree):
    return {jax.tree_util.keystr(p): np.array(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_ema_equals_the_reference_recurrence_and_skipped_steps_leave_it(tmp_path):
    rules = rules_for()
    graphdef, params = random_model(rules=rules)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    state, shardings = state_lib.create_sharded(graphdef, params, optim, 10, 0, rules, ema_decay=DECAY)
    initial, ema0 = _numpy(state.params), _numpy(state.ema)
    assert all(np.array_equal(ema0[n], initial[n]) for n in initial)  # ema_0 = the initial params

    def step(state, batch, poison):
        loss = functools.partial(pretrain.loss_fn, graphdef=state.graphdef, z_loss=0.0)
        grads, mean_loss, _ = state_lib.grad_step(loss, state.params, batch, 1)
        # poison = NaN makes the gradients non-finite: the step is skipped (nan_policy="skip").
        return state_lib.apply_gradients(state, jax.tree.map(lambda g: g * poison, grads), mean_loss, optim)

    step_jit = jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, None))
    rng = np.random.default_rng(0)
    ema = _numpy(state.params)
    previous = ema
    for k, poison in enumerate([1.0, 1.0, np.nan, 1.0, 1.0]):
        batch = jax.tree.map(jnp.asarray, lm_batch(rng, 8, 32, 128))
        state, metrics = step_jit(state, batch, jnp.float32(poison))
        params = _numpy(state.params)
        if np.isnan(poison):
            assert int(metrics["skipped"]) == 1
            assert all(np.array_equal(params[n], previous[n]) for n in params)
        else:
            assert not any(np.array_equal(params[n], previous[n]) for n in ("['lm_head'].value",))
            ema = {n: np.float32(DECAY) * ema[n] + np.float32(1 - DECAY) * params[n] for n in ema}
        previous = params
        got = _numpy(state.ema)
        for name in ema:
            np.testing.assert_allclose(got[name], ema[name], rtol=1e-6, atol=1e-7, err_msg=f"step {k + 1} {name}")
    assert int(state.guard["skipped"]) == 1
