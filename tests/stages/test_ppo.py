"""PPO: the rewards vector against a hand-written reference, advantages and returns against TRL's PPOTrainer
computation, an RM with its own tokenizer, accumulation invariance of the minibatch update, and bad input."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, OptimConfig, PpoConfig, from_config_dict
from jaxalign.data import chat, synthetic
from jaxalign.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from jaxalign.errors import ConfigError
from jaxalign.models.heads import RewardScorer, ScalarModel
from jaxalign.models.transformer import Transformer
from jaxalign.stages import ppo
from jaxalign.train import state as state_lib
from tests.helpers import rules_for, tiny

# Cheaper XLA compilation (as tests/test_losses.py): the compile, not the run, is what these tests wait for.
FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}

# --- the rewards vector --------------------------------------------------------------------------------------------


def _rows(rng, B, C):
    """Completion masks with lengths 1..C (one row of each of 1, C and something in between), log-probs."""
    lengths = np.array([1, C, *rng.integers(1, C + 1, B - 2)])
    mask = (np.arange(C)[None, :] < lengths[:, None]).astype(np.int32)
    logps = rng.normal(-2.0, 0.7, (B, C)).astype(np.float32)
    ref = (logps + rng.normal(0, 0.3, (B, C))).astype(np.float32)
    return lengths, mask, logps, ref


def test_ppo_rewards_put_the_score_on_the_last_real_token_and_the_kl_on_every_token():
    rng = np.random.default_rng(0)
    B, C, coef = 5, 6, 0.07
    lengths, mask, logps, ref = _rows(rng, B, C)
    scores = rng.normal(0, 1, B).astype(np.float32)
    for estimator in ("k1", "k3"):
        rewards, kl = jax.jit(functools.partial(ppo.ppo_rewards, kl_coef=coef, kl_estimator=estimator))(
            scores, logps, ref, mask
        )
        expected = np.zeros((B, C), np.float64)
        for b in range(B):
            for t in range(lengths[b]):
                d = float(logps[b, t]) - float(ref[b, t])
                k = d if estimator == "k1" else np.exp(-d) - 1 + d
                expected[b, t] = -coef * k + (scores[b] if t == lengths[b] - 1 else 0.0)
        np.testing.assert_allclose(np.asarray(rewards), expected, rtol=1e-5, atol=1e-6)
        assert not np.asarray(rewards)[mask == 0].any() and not np.asarray(kl)[mask == 0].any()


def test_missing_eos_penalty_only_hits_completions_without_a_stop():
    got = ppo.penalized_scores(np.array([1.0, 2.0, -1.0], np.float32), np.array([True, False, False]), 0.5)
    np.testing.assert_array_equal(got, np.array([1.0, 1.5, -1.5], np.float32))
    np.testing.assert_array_equal(
        ppo.penalized_scores(np.ones(2, np.float32), np.zeros(2, bool), 0.0), [1, 1]
    )


# --- advantages and returns against TRL ----------------------------------------------------------------------------


def _trl_masked_whiten(values, mask, shift_mean=True):
    """trl.trainer.utils.masked_whiten (TRL <= 0.2x, removed with PPOTrainer before 1.16), verbatim in torch."""
    import torch

    def masked_mean(v, m):
        return (v * m).sum() / m.sum()

    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * (mask.sum() / (mask.sum() - 1))
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def _trl_advantages(scores, logps, ref, values, lengths, cfg, score_after_eos: bool):
    """TRL PPOTrainer.train's steps 4-6 (rewards, optional whitening, GAE, whitened advantages), transcribed with
    torch from TRL's last PPOTrainer. `score_after_eos=False` applies jaxalign's one documented change: the score at
    `sequence_lengths` (the last real token) instead of `sequence_lengths + 1`, and values masked likewise."""
    import torch

    t = lambda x: torch.tensor(np.asarray(x, np.float32), dtype=torch.float64)
    logprobs, ref_logprobs, values, scores = t(logps), t(ref), t(values), t(scores)
    B, T = logprobs.shape
    sequence_lengths = torch.tensor(lengths - 1)  # index of the last real token
    response_idxs = torch.arange(T).repeat(B, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, 1.0)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, 1.0)
    sequence_lengths_p1 = sequence_lengths + 1 if score_after_eos else sequence_lengths
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)
    kl = logprobs - ref_logprobs
    non_score_reward = -cfg.kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += (
        scores  # TRL indexes with a list; a tuple is the same (and not deprecated)
    )
    if cfg.whiten_rewards:
        rewards = _trl_masked_whiten(rewards, ~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    gen_length = T
    for i in reversed(range(gen_length)):
        nextvalues = values[:, i + 1] if i < gen_length - 1 else 0.0
        delta = rewards[:, i] + cfg.gamma * nextvalues - values[:, i]
        lastgaelam = delta + cfg.gamma * cfg.lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return advantages.numpy(), torch.masked_fill(returns, padding_mask, 0).numpy()


@pytest.mark.parametrize(
    "full, cfg",
    [
        (True, PpoConfig(kl_coef=0.05)),
        (True, PpoConfig(kl_coef=0.2, gamma=0.9, lam=0.8, whiten_rewards=True)),
        (False, PpoConfig(kl_coef=0.05)),
        (False, PpoConfig(kl_coef=0.1, gamma=0.99, lam=0.9, whiten_rewards=True)),
    ],
)
def test_advantages_and_returns_equal_trl(full, cfg):
    """Rows that fill the budget (TRL and jaxalign place the score alike): TRL's code as it is. Rows that stop
    early: TRL's code with the score on the last real token (the module doc's deviation)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(1 + full)
    B, C = 6, 7
    lengths, mask, logps, ref = _rows(rng, B, C)
    if full:
        lengths, mask = np.full(B, C), np.ones((B, C), np.int32)
    scores = rng.normal(0, 1, B).astype(np.float32)
    values = rng.normal(0, 0.5, (B, C)).astype(np.float32)

    @jax.jit
    def ours(scores, logps, ref, values, mask):
        rewards, _ = ppo.ppo_rewards(scores, logps, ref, mask, kl_coef=cfg.kl_coef)
        return ppo.advantages_and_returns(rewards, values * mask, mask, cfg)

    adv, ret = ours(scores, logps, ref, values, mask)
    exp_adv, exp_ret = _trl_advantages(scores, logps, ref, values, lengths, cfg, score_after_eos=full)
    np.testing.assert_allclose(np.asarray(adv), exp_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), exp_ret, rtol=1e-4, atol=1e-5)


# --- an RM with another tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.write_world(str(tmp_path_factory.mktemp("world")), 40, seed=1)


def _texts(world):
    with open(world["pretrain_train"], encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def tokenizers(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = _texts(world)
    return train_sentencepiece(texts, str(d / "a.model"), 512), train_sentencepiece(
        texts, str(d / "b.model"), 384
    )


def test_an_rm_with_its_own_tokenizer_scores_the_conversation_it_was_trained_on(world, tokenizers):
    """Policy rows (tokenizer A) are decoded and re-encoded for an RM of tokenizer B: the RM sees exactly the ids
    B renders for the same conversation, and scores what scoring that rendering directly gives."""
    tok_a, tok_b = tokenizers
    assert tok_a.vocab_size != tok_b.vocab_size
    with open(world["rl_eval"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f][:6]
    completions = ["Paris.", "12 + 5 = 17.", "She works as a baker in Lyon.", "1987", "no", "x y z"]
    cfg = tiny(vocab_size=tok_b.vocab_size, max_seq_len=128)
    graphdef, params = nnx.split(ScalarModel(cfg, nnx.Rngs(3)))
    scorer = RewardScorer(graphdef, params, batch_size=4)
    to_rm = ppo.RewardInput(tok_a, tok_b, same=False)
    rows_a, rows_b = [], []
    for record, text in zip(records, completions, strict=True):
        prompt = record["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        answer = [{"role": "assistant", "content": text}]
        p_a, c_a, _ = chat.render_continuation(tok_a, messages, answer, "chatml")
        p_b, c_b, _ = chat.render_continuation(tok_b, messages, answer, "chatml")
        stop_a, stop_b = chat.special_id(tok_a, "<|im_end|>"), chat.special_id(tok_b, "<|im_end|>")
        rows_a.append((p_a, c_a[: c_a.index(stop_a) + 1]))  # a sampled completion ends at its stop token
        rows_b.append(p_b + c_b[: c_b.index(stop_b) + 1])
    got = [to_rm(p, c) for p, c in rows_a]
    assert got == rows_b
    sampled = ppo.rollout.Sampled(*_pad(rows_a, tok_a.pad_id))
    direct = np.array([float(scorer.score([r])[0]) for r in rows_b], np.float32)
    np.testing.assert_allclose(ppo.score_rows(scorer, to_rm, sampled), direct, rtol=1e-5, atol=1e-6)
    assert np.ptp(direct) > 0  # the rows are told apart


def _pad(rows, pad_id):
    """(completion tokens, mask, logps, prompt ids, prompt mask) of (prompt, completion) id lists, as the sampler
    lays them out (prompts left-padded, completions right-padded)."""
    W, C = max(len(p) for p, _ in rows), max(len(c) for _, c in rows)
    tokens, cmask = np.full((len(rows), C), pad_id, np.int32), np.zeros((len(rows), C), np.int32)
    pids, pmask = np.full((len(rows), W), pad_id, np.int32), np.zeros((len(rows), W), np.int32)
    for i, (p, c) in enumerate(rows):
        tokens[i, : len(c)], cmask[i, : len(c)] = c, 1
        pids[i, W - len(p) :], pmask[i, W - len(p) :] = p, 1
    return tokens, cmask, np.zeros((len(rows), C), np.float32), pids, pmask


def test_the_same_tokenizer_passes_ids_through(tokenizers):
    tok_a, _ = tokenizers
    assert ppo.RewardInput(tok_a, tok_a, same=True)([1, 2], [3, 4]) == [1, 2, 3, 4]
    assert isinstance(tok_a, SentencePieceTokenizer)


# --- the minibatch update ------------------------------------------------------------------------------------------


def _models(rules=None):
    small = dict(vocab_size=96, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    policy_cfg, value_cfg = tiny(**small), tiny(**{**small, "d_model": 16})
    pg, pp = nnx.split(Transformer(policy_cfg, nnx.Rngs(0), rules))
    vg, vp = nnx.split(ScalarModel(value_cfg, nnx.Rngs(1), rules))
    return (pg, vg), {"policy": pp, "value": vp}


def _update_batch(rng, B=8, W=5, C=6):
    lengths, mask, logps, _ = _rows(rng, B, C)
    pmask = np.ones((B, W), np.int32)
    pmask[0, :2] = 0  # left padding
    return {
        "prompt_ids": rng.integers(3, 96, (B, W)).astype(np.int32),
        "prompt_mask": pmask,
        "completion_ids": rng.integers(3, 96, (B, C)).astype(np.int32),
        "completion_mask": mask,
        "old_logps": (logps * mask).astype(np.float32),
        "old_values": (rng.normal(0, 0.5, (B, C)) * mask).astype(np.float32),
        "advantages": (rng.normal(0, 1, (B, C)) * mask).astype(np.float32),
        "returns": (rng.normal(0, 1, (B, C)) * mask).astype(np.float32),
    }


def test_minibatch_loss_and_gradient_are_the_same_under_accumulation():
    graphdefs, params = _models()
    batch = _update_batch(np.random.default_rng(2))
    cfg = PpoConfig(cliprange=0.1, cliprange_value=0.05, vf_coef=0.3)
    loss = functools.partial(ppo.loss_fn, graphdefs=graphdefs, cfg=cfg)
    run = jax.jit(lambda p, b, n: state_lib.grad_step(loss, p, b, n), static_argnums=2, compiler_options=FAST)
    g1, l1, m1 = run(params, batch, 1)
    g2, l2, m2 = run(params, batch, 2)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
    for k in (
        "loss/policy_avg",
        "loss/value_avg",
        "policy/clipfrac_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
    ):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7)
    # The loss is the clipped policy loss + vf_coef * the clipped value loss, both token means.
    np.testing.assert_allclose(
        float(l1), float(m1["loss/policy_avg"] + 0.3 * m1["loss/value_avg"]), rtol=1e-5
    )
    assert 0 < float(m1["val/clipfrac_avg"]) < 1  # old values far from the model's: the value clip bites


# --- bad input -----------------------------------------------------------------------------------------------------


def _config(tmp_path, **sections) -> Config:
    values = {"workdir": str(tmp_path), "job": "ppo", "ppo": {"reward_model": "rm"}}
    for name, section in sections.items():
        values.setdefault(name, {}).update(section)
    return from_config_dict(values)


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"ppo": {"value_init": "critic"}},
            r"^ppo.value_init='critic' is not one of \['reward', 'policy'\]$",
        ),
        ({"ppo": {"cliprange": 0.0}}, r"^ppo.cliprange=0.0 must be > 0$"),
        ({"ppo": {"num_mini_batches": 0}}, r"^ppo.num_mini_batches=0 must be > 0$"),
        ({"ppo": {"lam": 1.5}}, r"^ppo.lam=1.5 must be in \[0, 1\]$"),
        ({"ppo": {"kl_estimator": "k2"}}, r"^ppo.kl_estimator='k2' is not one of \['k1', 'k3'\]$"),
    ],
)
def test_bad_ppo_config_is_one_line(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **sections)


@pytest.mark.parametrize(
    "train, ppo_section, message",
    [
        (
            {"batch_size": 8},
            {"num_mini_batches": 3},
            "ppo.num_mini_batches=3 does not divide train.batch_size=8",
        ),
        (
            {"batch_size": 12, "grad_accum": 2},
            {"num_mini_batches": 4},
            "train.grad_accum=2 does not divide the minibatch of 3 rows",
        ),
        ({"batch_size": 8}, {"num_mini_batches": 4}, "is not divisible by the data-parallel size 8"),
        ({"batch_size": 8}, {"max_completion_length": 2000}, "exceeds model.max_seq_len=2048"),
    ],
)
def test_batch_that_does_not_split_is_one_line(tmp_path, train, ppo_section, message):
    config = _config(tmp_path, train=train, ppo=ppo_section)
    with pytest.raises(ConfigError, match=message) as e:
        ppo.check_batch(config, rules_for())
    assert "\n" not in str(e.value)


def test_no_reward_model_is_one_line(tmp_path):
    config = _config(tmp_path, ppo={"reward_model": ""})
    with pytest.raises(ConfigError, match=r"^ppo.reward_model is empty: pass .*bootstrap_steps > 0"):
        ppo.bootstrap(config)


def test_value_init_from_an_rm_with_another_tokenizer_is_one_line(tmp_path, tokenizers):
    a, b = (t.path for t in tokenizers)
    config = _config(tmp_path, data={"tokenizer": a}, ppo={"reward_tokenizer": b, "value_init": "reward"})
    with pytest.raises(ConfigError, match=r"^ppo.value_init='reward': the reward model's tokenizer .* use "):
        ppo.load_reward(config, tokenizers[0])


def test_rewards_jit_on_a_sharded_batch():
    """The rewards and advantages of a batch sharded over 8 devices equal the unsharded ones."""
    rng = np.random.default_rng(5)
    lengths, mask, logps, ref = _rows(rng, 8, 5)
    scores, values = rng.normal(0, 1, 8).astype(np.float32), rng.normal(0, 1, (8, 5)).astype(np.float32)
    cfg = PpoConfig()

    def f(s, lp, r, v, m):
        rew, _ = ppo.ppo_rewards(s, lp, r, m, kl_coef=cfg.kl_coef)
        return ppo.advantages_and_returns(rew, v * m, m, cfg)

    rules = rules_for()
    shard = lambda x: jax.device_put(x, rules.sharding(("batch",) + ("length",) * (x.ndim - 1), x.shape))
    plain = jax.jit(f)(scores, logps, ref, values, mask)
    sharded = jax.jit(f)(*(shard(x) for x in (scores, logps, ref, values, mask)))
    for a, b in zip(plain, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    assert jnp.isfinite(plain[0]).all() and float(losses.masked_mean(plain[0], mask)) == pytest.approx(
        0, abs=1e-5
    )


# --- the whole step ------------------------------------------------------------------------------------------------

OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=0.0, eps=1e-4)  # eps: see test_grpo


def _after_step(cfg, microbatches, rules):
    graphdefs, params = _models(rules)
    state, _ = state_lib.create_sharded(graphdefs, params, OPTIM, 10, 0, rules)
    ref = jax.tree.map(jnp.copy, params["policy"])
    rng = np.random.default_rng(4)
    batch = {k: v for k, v in _update_batch(rng).items() if k in ppo.BATCH_KEYS}
    batch["scores"] = rng.normal(0, 1, 8).astype(np.float32)
    shardings = ppo.batch_shardings(rules)
    placed = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    step = jax.jit(
        functools.partial(ppo.train_step, cfg=cfg, optim=OPTIM, microbatches=microbatches),
        compiler_options=FAST,
    )
    state, metrics = step(state, placed, ref)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)], metrics, batch


def test_step_is_the_same_under_grad_accum_and_a_data_parallel_mesh():
    """One epoch over two minibatches of a permuted batch (two updates, as test_grpo's): the permutation, GAE over the
    whole batch and both updates agree. (More Adam updates amplify float summation-order noise in near-zero gradients
    past any fixed tolerance, as test_grpo notes.)"""
    cfg = PpoConfig(num_ppo_epochs=1, num_mini_batches=2, kl_coef=0.1)
    one, m1, batch = _after_step(cfg, 1, rules_for(1, fsdp=1))
    mesh, m2, _ = _after_step(cfg, 2, rules_for(4, data=2, fsdp=2))
    for a, b in zip(one, mesh, strict=True):
        # atol: 1 of 3,072 weights of the first matrix 1.43e-6 apart on an AVX-512 CPU (within 1e-6 on AVX2).
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6)
    for k in ("loss", "objective/kl", "objective/scores", "loss/value_avg", "policy/clipfrac_avg"):
        np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, atol=1e-7)
    # The reference is the starting policy: no KL at rollout; the scores are the batch's.
    assert float(m1["objective/kl"]) == 0.0
    np.testing.assert_allclose(float(m1["objective/scores"]), batch["scores"].mean(), rtol=1e-6)
    _, params = _models()
    assert not np.allclose(one[0], np.asarray(jax.tree.leaves(params)[0]))  # the weights moved


def test_entropy_is_that_of_the_sampling_distribution():
    """`policy/entropy_avg`'s per-token entropies: -sum p log p of the processed (temperature, top-k) distribution,
    finite where top-k removed tokens, at most log k."""
    from jaxalign.rl import sampler

    (pg, _), params = _models()
    batch = _update_batch(np.random.default_rng(6))
    model = nnx.merge(pg, params["policy"])

    def both(p, b, top_k):
        return sampler.completion_logps(
            pg, p, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
            temperature=0.7, top_k=top_k, with_entropy=True,
        )  # fmt: skip

    run = jax.jit(both, static_argnums=2, compiler_options=FAST)
    W, C = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    tokens = np.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
    segments = np.concatenate([batch["prompt_mask"], np.ones_like(batch["completion_ids"])], 1)
    positions = np.maximum(np.cumsum(segments, 1) - 1, 0)
    h = model.hidden(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
    logits = np.asarray(model.logits(h.reshape(-1, h.shape[-1]))).reshape(len(tokens), W + C, -1)[
        :, W - 1 : -1
    ]
    mask = batch["completion_mask"] > 0
    for top_k in (0, 5):
        logps, entropy = run(params["policy"], batch, top_k)
        z = logits / 0.7
        if top_k:
            kth = np.sort(z, axis=-1)[..., -top_k][..., None]
            z = np.where(z >= kth, z, -np.inf)
        logp = (
            z
            - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True))
            - z.max(-1, keepdims=True)
        )
        expected = -np.sum(np.where(np.isfinite(logp), np.exp(logp) * logp, 0.0), -1)
        np.testing.assert_allclose(np.asarray(entropy)[mask], expected[mask], rtol=1e-4, atol=1e-5)
        assert not np.asarray(entropy)[~mask].any()
        # Random tokens outside the top k have log-prob -inf; without top-k every log-prob is finite.
        assert np.isfinite(np.asarray(logps)).all() == (top_k == 0)
        if top_k:
            assert np.asarray(entropy)[mask].max() <= np.log(top_k) + 1e-5
