"""The KV-cache sampler against its oracles: transformers' greedy `generate` (tiny random checkpoints through
`hf.load`), the trainer's teacher-forced `completion_logps`, a numpy top-k/top-p reference, and the invariants
shared prefill == independent prefills, sharded == single device, per-row EOS.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.errors import ConfigError, DataError
from jaxalign.models import hf
from jaxalign.rl import sampler
from tests.helpers import random_model, rules_for

# Different lengths on purpose: the batch is left-padded to 7.
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [42, 17, 8, 99, 100, 1, 64]]
NEW = 8


@pytest.fixture(scope="module")
def model():
    return nnx.merge(*random_model(seed=0, n_heads=4, n_kv_heads=2))


def generate(model, prompts=PROMPTS, **kwargs):
    out = sampler.generate(model, prompts, **{"max_new_tokens": NEW, **kwargs})
    return jax.tree.map(np.asarray, out)


# --- transformers parity ---------------------------------------------------------------------------------------

HF_CASES = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2), False),
    "qwen2_bias_scan": ("qwen2", dict(num_key_value_heads=2), True),
    "qwen3_qknorm": ("qwen3", dict(num_key_value_heads=1, head_dim=16), False),
    "gemma_scan": ("gemma", dict(num_key_value_heads=1, head_dim=8), True),
}


@pytest.mark.parametrize("name", list(HF_CASES))
def test_greedy_generation_matches_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.models.test_hf import make_hf_model

    family, overrides, scan = HF_CASES[name]
    hf_model = make_hf_model(family, seed=1, **overrides)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    prompts = [[7, 30, 2, 99, 140], [3], [12, 150, 61]]
    expected = []
    with torch.no_grad():
        for prompt in prompts:  # one by one: no padding on the transformers side
            ids = torch.tensor([prompt])
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False
            )
            expected.append(out[0, len(prompt) :].numpy())
    ours = generate(hf.load(str(tmp_path), dtype=jnp.float32, scan_layers=scan), prompts, temperature=0.0)
    np.testing.assert_array_equal(ours.tokens, np.stack(expected))
    assert ours.mask.all()


# --- log-probs --------------------------------------------------------------------------------------------------


# Sampling with G = 2 and two EOS ids (masked positions included); greedy with the arguments the EOS tests use
# (compiled once for the module).
LOGP_CASES = {
    "t0.7_k10_p0.85": dict(temperature=0.7, top_k=10, top_p=0.85, rng=3, num_generations=2, eos_id=[17, 29]),
    "t1.3": dict(temperature=1.3, rng=3, num_generations=2, eos_id=[17, 29]),
    "greedy": dict(temperature=0.0),
}


@pytest.mark.parametrize("case", list(LOGP_CASES))
def test_sampler_logps_equal_completion_logps(model, case):
    kwargs = LOGP_CASES[case]
    out = generate(model, **kwargs)
    graphdef, params = nnx.split(model)
    kw = {k: kwargs.get(k, default) for k, default in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0))}
    expected = jax.jit(functools.partial(sampler.completion_logps, graphdef, **kw))(
        params, out.prompt_ids, out.prompt_mask, out.tokens, out.mask
    )
    err = np.abs(np.asarray(expected) - out.logps).max()
    print(f"{case}: max |sampler - completion_logps| = {err:.2e}")
    assert err <= 2e-5
    assert (out.logps[out.mask == 1] < 0).all() and (out.logps[out.mask == 0] == 0).all()


def numpy_kept(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The reference kept set: the top_k largest, then the smallest prefix (by probability) reaching top_p."""
    order = np.argsort(-logits, kind="stable")
    kept = np.zeros(len(logits), bool)
    kept[order[: top_k or len(logits)]] = True
    probs = np.where(kept, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    mass = 0.0
    nucleus = np.zeros_like(kept)
    for i in order:
        if not kept[i] or mass >= top_p:
            break
        nucleus[i] = True
        mass += probs[i]
    return nucleus


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (0, 0.6), (6, 0.8)])
def test_top_k_top_p_never_emit_a_masked_token(top_k, top_p):
    """4096 draws from a peaked 64-token distribution: every token is in the numpy reference's kept set, the
    frequencies match the renormalised probabilities, and logps are their logs."""
    V, N, temperature = 64, 4096, 0.8
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32) * 3
    kept = numpy_kept(logits / temperature, top_k, top_p)
    assert 1 < kept.sum() < V
    probs = np.where(kept, np.exp(logits / temperature - (logits / temperature).max()), 0.0)
    probs /= probs.sum()
    draw = jax.jit(
        functools.partial(sampler.sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    )
    tokens, logps = (np.asarray(x) for x in draw(jnp.tile(logits, (N, 1)), jax.random.key(0)))
    assert kept[tokens].all()
    np.testing.assert_allclose(logps, np.log(probs[tokens]), rtol=1e-5, atol=1e-5)
    freq = np.bincount(tokens, minlength=V) / N
    assert np.abs(freq - probs).max() <= 4 * np.sqrt(probs.max() / N)


@pytest.mark.parametrize("top_k", [0, 40])
def test_inverse_cdf_draws_match_the_distribution_across_blocks(top_k):
    """8192 draws over 1000 tokens (8 blocks of 128, the last one padded) at temperature 1: frequencies match the
    softmax within 4 standard errors per token, masked tokens (beyond the top 40, spread over every block) never
    come out, and every row of one call draws on its own (rows differ)."""
    V, N = 1000, 8192
    logits = np.random.default_rng(1).normal(size=V).astype(np.float32) * 2
    kept = numpy_kept(logits, top_k, 1.0)
    probs = np.where(kept, np.exp(logits - logits.max()), 0.0)
    probs /= probs.sum()
    draw = jax.jit(functools.partial(sampler.sample_tokens, temperature=1.0, top_k=top_k))
    tokens, logps = (np.asarray(x) for x in draw(jnp.tile(logits, (N, 1)), jax.random.key(3)))
    assert kept[tokens].all()
    np.testing.assert_allclose(logps, np.log(probs[tokens]), rtol=1e-5, atol=1e-5)
    freq = np.bincount(tokens, minlength=V) / N
    assert np.all(np.abs(freq - probs) <= 4 * np.sqrt(probs * (1 - probs) / N) + 1 / N)
    assert len(set(tokens[:64].tolist())) > 8


def test_inverse_cdf_never_draws_zero_mass_at_either_end_of_the_range(monkeypatch):
    """u = 0 draws each row's first token of positive mass; u = the total (where float rounding can leave no
    cumulative sum above u) its last one. Rows with empty blocks and masked tokens in between: never a masked
    token."""
    probs = np.zeros((3, 300), np.float32)
    probs[0, [5, 130]] = [0.25, 0.75]
    probs[1, 299] = 1.0
    probs[2, :3] = [0.5, 0.0, 0.5]
    for u, expected in ((0.0, [5, 299, 0]), (1.0, [130, 299, 2])):
        monkeypatch.setattr(
            sampler.jax.random, "uniform", lambda key, shape, dtype, u=u: jnp.full(shape, u, dtype)
        )
        tokens = sampler.inverse_cdf_sample(jnp.asarray(probs), jax.random.key(0))
        np.testing.assert_array_equal(tokens, expected)


def test_top_k_1_is_greedy_through_the_loop(model):
    np.testing.assert_array_equal(
        generate(model, temperature=1.0, top_k=1, rng=5).tokens, generate(model, temperature=0.0).tokens
    )


# --- EOS, shared prefill, determinism ----------------------------------------------------------------------------


def test_eos_stops_one_row_while_the_others_go_on(model):
    free = generate(model, temperature=0.0)
    # An id that row 1 emits first at step 3 and no other row ever emits.
    step = 3
    eos = int(free.tokens[1, step])
    assert eos not in free.tokens[1, :step] and eos not in free.tokens[[0, 2]], "pick another step"
    unused = int(next(i for i in range(128) if i not in free.tokens))
    out = generate(model, temperature=0.0, eos_id=(unused, eos), pad_id=0)
    np.testing.assert_array_equal(out.tokens[[0, 2]], free.tokens[[0, 2]])
    np.testing.assert_array_equal(out.logps[[0, 2]], free.logps[[0, 2]])
    assert out.mask[[0, 2]].all()
    np.testing.assert_array_equal(out.tokens[1, : step + 1], free.tokens[1, : step + 1])  # EOS kept
    np.testing.assert_array_equal(out.mask[1], [1] * (step + 1) + [0] * (NEW - step - 1))
    assert (out.tokens[1, step + 1 :] == 0).all() and (out.logps[1, step + 1 :] == 0).all()


def test_every_row_done_exits_early_with_padding(model):
    """Once every row has stopped the loop ends early; rows keep their tokens up to their first EOS, then pad."""
    free = generate(model, temperature=0.0)
    eos = sorted({int(t) for t in free.tokens[:, 1]})  # every row stops at step 1 at the latest
    out = generate(model, temperature=0.0, eos_id=eos)
    for row, expected in zip(out.tokens, free.tokens, strict=True):
        stop = int(np.flatnonzero(np.isin(expected, eos))[0])
        assert stop <= 1
        np.testing.assert_array_equal(row, np.where(np.arange(NEW) <= stop, expected, 0))
    np.testing.assert_array_equal(out.mask, (out.tokens != 0) | (np.arange(NEW) == 0))


def test_shared_prefill_equals_independent_prefills(model):
    G = 3
    shared = generate(model, temperature=1.0, top_k=20, rng=7, num_generations=G)
    repeated = generate(model, [p for p in PROMPTS for _ in range(G)], temperature=1.0, top_k=20, rng=7)
    np.testing.assert_array_equal(shared.tokens, repeated.tokens)
    # The prompt's KV from a batch of P rows or of P x G: matmuls of other shapes, which XLA's CPU kernels may sum in
    # another order (AVX-512: 1.4e-6 = 4 ulps on one logp of -3.18 of 72; AVX2: within 1e-6).
    np.testing.assert_allclose(shared.logps, repeated.logps, rtol=5e-7, atol=1e-6)
    np.testing.assert_array_equal(shared.prompt_ids, repeated.prompt_ids)
    # The G samples of a prompt differ (they are not one sample copied), and the same rng gives the same samples.
    assert len({tuple(r) for r in shared.tokens[:G]}) > 1
    again = generate(model, temperature=1.0, top_k=20, rng=7, num_generations=G)
    np.testing.assert_array_equal(shared.tokens, again.tokens)
    other = generate(model, temperature=1.0, top_k=20, rng=8, num_generations=G)
    assert (other.tokens != shared.tokens).any()


def test_rl_loader_batch_and_jitted_sample_equal_generate(model):
    """An `rl_loader`-style left-padded batch and the jittable `sample` give what the list-of-prompts `generate`
    gives (same arguments as the test above: compiled once)."""
    expected = generate(model, temperature=1.0, top_k=20, rng=7, num_generations=3)
    width = max(map(len, PROMPTS))
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for b, p in enumerate(PROMPTS):
        ids[b, width - len(p) :], mask[b, width - len(p) :] = p, 1
    batch = generate(
        model, {"prompt_ids": ids, "prompt_mask": mask}, temperature=1.0, top_k=20, rng=7, num_generations=3
    )
    np.testing.assert_array_equal(batch.tokens, expected.tokens)
    np.testing.assert_array_equal(batch.logps, expected.logps)

    graphdef, params = nnx.split(model)
    run = jax.jit(
        functools.partial(
            sampler.sample, graphdef, max_new_tokens=NEW, temperature=1.0, top_k=20, num_generations=3
        )
    )
    jitted = jax.tree.map(np.asarray, run(params, ids, mask, jax.random.key(7)))
    np.testing.assert_array_equal(jitted.tokens, expected.tokens)
    np.testing.assert_allclose(jitted.logps, expected.logps, atol=1e-6)


# --- sharding ------------------------------------------------------------------------------------------------------


def test_sharded_generation_equals_single_device():
    """data=2 x fsdp=2 x tensor=2 over the 8 devices: batch over data/fsdp, heads and the cache's kv heads over
    tensor; the same tokens and (to float rounding) log-probs as one device."""
    rules = rules_for(data=2, fsdp=2, tensor=2)
    kw = dict(n_heads=4, n_kv_heads=2, d_model=32)
    sharded = nnx.merge(*random_model(seed=2, rules=rules, **kw))
    single = nnx.merge(*random_model(seed=2, rules=rules_for(devices=1), **kw))
    prompts = PROMPTS + [[1, 2, 3]]
    args = dict(temperature=1.0, top_k=20, top_p=0.95, rng=4, num_generations=2)
    a, b = generate(sharded, prompts, **args), generate(single, prompts, **args)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
    # The cache really is split: batch over data x fsdp, kv heads over tensor.
    graphdef, params = nnx.split(sharded)
    ids = jax.device_put(np.ones((4, 7), np.int32), rules.sharding(("batch", "length")))
    cache = sampler.jit_prefill(graphdef, params, ids, ids, cache_len=7 + NEW, num_generations=2)[0]
    spec = cache.k.sharding.spec
    assert spec[1] == ("data", "fsdp") and spec[3] == "tensor", spec


# --- bad requests ------------------------------------------------------------------------------------------------

BAD = {
    "overflow": (dict(max_new_tokens=125), ConfigError, "max_seq_len=128"),
    "cache": (dict(cache_len=10), ConfigError, "cache_len=10"),
    "empty_prompt": (dict(prompts=[[1, 2], []]), DataError, "prompts[1] is empty"),
    "not_lists": (dict(prompts="hello"), DataError, "list of token-id lists"),
    "token_range": (dict(prompts=[[1, 500]]), DataError, "vocab_size=128"),
    "generations": (dict(num_generations=0), ConfigError, "num_generations=0"),
    "temperature": (dict(temperature=-0.5), ConfigError, "temperature=-0.5"),
    "top_k": (dict(top_k=-1), ConfigError, "top_k=-1"),
    "top_p": (dict(top_p=0.0), ConfigError, "top_p=0.0"),
    "new_tokens": (dict(max_new_tokens=0), ConfigError, "max_new_tokens=0"),
    "eos": (dict(eos_id=[3, 999]), ConfigError, "eos_id=[3, 999]"),
    "right_padded": (
        dict(prompts={"prompt_ids": np.ones((1, 3)), "prompt_mask": np.array([[1, 1, 0]])}),
        DataError,
        "not left-padded",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_one_line_errors(model, case):
    kwargs, error, needle = BAD[case]
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        sampler.generate(model, **kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
