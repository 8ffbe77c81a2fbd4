"""Gradient accumulation == one big batch for every stage's `train_step`: one step with `grad_accum` 1, 2 and 4 from
the same state, on batches of the real loaders over the synthetic world, gives the same update, loss and metrics.

The optimizer is AdamW with eps far above every gradient entry: its first update is then -lr * g / (|g| + eps), a
smooth function of the gradient that keeps its relative error (plain Adam's first step, lr * sign(g), would hide a
gradient off by any positive factor). So equal updates mean equal accumulated gradients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign.config import DpoConfig, OptimConfig
from jaxalign.data import pipelines, prompt_pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.models.heads import ScalarModel
from jaxalign.models.transformer import Transformer
from jaxalign.stages import dpo, reward, sft
from jaxalign.train import state as state_lib
from tests.helpers import rules_for, tiny

OPTIM = OptimConfig(lr=1.0, eps=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
MODEL = tiny(vocab_size=512, n_layers=1)  # one layer: compiling each step variant is most of the cost
ROWS = 8


@pytest.fixture(scope="module")
def rules():
    return rules_for(devices=1)


@pytest.fixture(scope="module")
def tok(small_world):
    return SentencePieceTokenizer(small_world["tokenizer"])


@pytest.fixture(scope="module")
def sft_batch(small_world, tok):
    loader = pipelines.sft_loader(
        small_world["sft_train"], tok, seq_len=128, global_batch_size=ROWS, seed=0, shuffle=False
    )
    try:
        return next(loader)
    finally:
        loader.close()


@pytest.fixture(scope="module")
def pref_batch(small_world, tok):
    loader = prompt_pipelines.preference_loader(
        small_world["preference_train"],
        tok,
        seq_len=64,
        max_prompt_length=32,
        global_batch_size=ROWS,
        seed=0,
        shuffle=False,
    )
    try:
        return next(loader)
    finally:
        loader.close()


def _state(rules, scalar=False, seed=0):
    cls = ScalarModel if scalar else Transformer
    graphdef, params = nnx.split(cls(MODEL, nnx.Rngs(seed), rules))
    return state_lib.create(graphdef, params, OPTIM, 10, seed)


@pytest.fixture(scope="module")
def run_step():
    """`run_step(key, step_fn, state, batch, *extra)`: one jitted step, memoised by `key` (the one-batch step of a
    case is shared by its parametrisations; every compilation costs seconds)."""
    done = {}

    def run(key, step_fn, state, batch, *extra):
        if key not in done:
            # Not donated: every variant starts from the same state.
            done[key] = jax.jit(step_fn)(state, jax.tree.map(jnp.asarray, batch), *extra)
        return done[key]

    return run


def _assert_close_trees(a_tree, b_tree):
    """Equal to rtol 1e-5 relative to the tree's largest entry: summed in another order, entries that nearly cancel
    (e.g. the reward head's bias gradient, zero in exact arithmetic but for the centering term) carry float32
    rounding of the order of the summed terms, not of their result."""
    a, b = [np.asarray(x) for x in jax.tree.leaves(a_tree)], [np.asarray(x) for x in jax.tree.leaves(b_tree)]
    scale = max(np.abs(x).max() for x in a)
    assert scale > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5 * scale)


def _adam(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return adam


def _assert_same_step(one, many):
    """Same params, same Adam moments (the first is 0.1 x the accumulated gradient: compared as computed, not
    through a rounded parameter difference), same loss and metrics."""
    (s1, m1), (sn, mn) = one, many
    assert int(sn.step) == int(s1.step) == 1
    assert float(m1["lr"]) == OPTIM.lr and float(m1["skipped"]) == 0
    _assert_close_trees(s1.params, sn.params)
    adam_1, adam_n = _adam(s1.opt_state), _adam(sn.opt_state)
    assert int(adam_1.count) == int(adam_n.count) == 1
    _assert_close_trees(adam_1.mu, adam_n.mu)
    _assert_close_trees(adam_1.nu, adam_n.nu)
    assert set(mn) == set(m1)
    for k in m1:
        np.testing.assert_allclose(float(mn[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(m1["grad_norm"]) > 0


@pytest.mark.parametrize("microbatches", [2, 4])
def test_sft(rules, sft_batch, run_step, microbatches):
    state = _state(rules)
    step = lambda n: functools.partial(sft.train_step, optim=OPTIM, microbatches=n)
    one = run_step("sft", step(1), state, sft_batch)
    many = run_step(("sft", microbatches), step(microbatches), state, sft_batch)
    _assert_same_step(one, many)
    assert float(one[1]["num_tokens"]) == sft_batch["weights"].sum() > 0


def test_reward(rules, pref_batch, run_step):
    state = _state(rules, scalar=True)
    step = lambda n: functools.partial(reward.train_step, optim=OPTIM, center_coef=0.01, microbatches=n)
    one = run_step("reward", step(1), state, pref_batch)
    many = run_step(("reward", 2), step(2), state, pref_batch)
    _assert_same_step(one, many)
    assert 0 < float(one[1]["accuracy"]) < 1  # pairs on both sides: the metric means something here


@pytest.fixture(scope="module")
def reference(rules, pref_batch):
    """A frozen reference unlike the policy (another seed), and its log-probs of the batch as a precomputed
    reference's keys."""
    ref = _state(rules, seed=1)
    fn = jax.jit(functools.partial(dpo.reference_logps, graphdef=ref.graphdef))
    c, r = fn(ref.params, jax.tree.map(jnp.asarray, pref_batch))
    return ref.params, {"ref_chosen_logps": np.asarray(c), "ref_rejected_logps": np.asarray(r)}


# (objective config, reference, microbatches): the live reference is the step's third argument; a precomputed one
# travels in the batch. IPO is length-normalised; rpo_alpha adds the chosen NLL normalised by the whole batch's tokens.
DPO_CASES = {
    "sigmoid-live": (DpoConfig(objective="dpo", loss_type="sigmoid"), "live", 2),
    "ipo-rpo-precomputed": (DpoConfig(objective="dpo", loss_type="ipo", rpo_alpha=0.5), "precomputed", 4),
    "simpo": (DpoConfig(objective="simpo", beta=2.0, simpo_gamma=0.5), None, 2),
    "orpo": (DpoConfig(objective="orpo", beta=0.1), None, 2),
}


@pytest.mark.parametrize("case", sorted(DPO_CASES))
def test_dpo(rules, pref_batch, reference, run_step, case):
    cfg, ref_mode, microbatches = DPO_CASES[case]
    state = _state(rules)
    ref_params, ref_keys = reference
    batch, extra = pref_batch, ()
    if ref_mode == "live":
        extra = (ref_params,)
    elif ref_mode == "precomputed":
        batch = {**pref_batch, **ref_keys}
    step = lambda n: functools.partial(dpo.train_step, cfg=cfg, optim=OPTIM, microbatches=n)
    one = run_step(case, step(1), state, batch, *extra)
    many = run_step((case, microbatches), step(microbatches), state, batch, *extra)
    _assert_same_step(one, many)
    if cfg.objective == "dpo":
        # The reference differs from the policy: log-ratios, hence rewards/margins, are not all zero.
        assert abs(float(one[1]["rewards/margins"])) > 1e-3
    if cfg.rpo_alpha:
        assert float(one[1]["nll_loss"]) > 0
