"""GRPO: reward functions on hand cases, the jitted step against `losses.grpo_loss`, accumulation and mesh
invariance, whole groups under micro-batching and sharding, and bad input (one line or a counted skip)."""

import dataclasses
import functools
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.config import Config, GrpoConfig, OptimConfig, from_config_dict
from jaxalign.data import prompt_pipelines, synthetic
from jaxalign.data.tokenizer import train_sentencepiece
from jaxalign.errors import ConfigError, DataError
from jaxalign.models.heads import RewardScorer, ScalarModel
from jaxalign.models.transformer import Transformer
from jaxalign.rl import rewards, sampler
from jaxalign.stages import grpo, rollout
from jaxalign.train import state as state_lib
from launch.local import cluster_env, free_port
from tests.helpers import rules_for, tiny
from tests.train.test_multiprocess import launch_env
from tests.train.test_resume import ROOT

# --- reward functions ----------------------------------------------------------------------------------------------


def test_extract_answer_and_answer_reward():
    assert [rewards.extract_answer(t) for t in ("17", " 17.", "12 + 5 = 17.", "Paris.", "a = b = 3")] == [
        "17",
        "17",
        "17",
        "Paris",
        "3",
    ]
    texts = ["12 + 5 = 17.", "17", "171", "Paris", "paris", "The answer is 17"]
    extras = [{"answer": "17"}] * 3 + [{"answer": "Paris"}] * 2 + [{"answer": 17}]
    assert rewards.answer_reward(texts, extras) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    with pytest.raises(KeyError, match="no 'answer' column"):
        rewards.answer_reward(["17"], [{"id": 1}])


def test_format_reward_needs_the_stop_and_a_short_answer():
    texts = ["17", "17", " ".join(["w"] * rewards.FORMAT_MAX_WORDS), " ".join(["w"] * 9)]
    extras = [{"stopped": True}, {"stopped": False}, {"stopped": True}, {"stopped": True}]
    assert rewards.format_reward(texts, extras) == [1.0, 0.0, 1.0, 0.0]


def test_restate_reward_counts_the_restated_parts_of_the_question():
    question = [{"role": "user", "content": "What is 7 - 3?"}]
    texts = [
        "7 - 3 = 4.",
        "7 - 3 = 5.",
        "7 + 3 = 10.",
        "3 - 7 = -4.",
        "4 - 8 = -4.",
        "4",
        "7 - 3",
        "-7 - -3 =",
    ]
    got = rewards.restate_reward(texts, [{"prompt": question}] * len(texts))
    assert got == [1.0, 1.0, 2 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 1 / 3]
    # Plain-text prompts, negative operands, and prompts that are not arithmetic (0.0 whatever the completion).
    plain = [{"prompt": "What is -2 * 5?"}, {"prompt": "What is the birth city of Ana Silva?"}]
    assert rewards.restate_reward(["-2 * 5 = -10.", "1 + 1 = 2."], plain) == [1.0, 0.0]
    with pytest.raises(KeyError, match="no 'prompt' column"):
        rewards.restate_reward(["4"], [{"answer": "4"}])


def test_overlong_penalty_is_dapos_soft_ramp():
    got = rewards.overlong_penalty(np.array([0, 12, 13, 14, 16, 20]), max_length=16, buffer=4, factor=0.5)
    np.testing.assert_allclose(got, [0, 0, -0.125, -0.25, -0.5, -0.5])
    assert not rewards.overlong_penalty(np.array([16]), 16, 0).any()


def test_reward_set_is_the_weighted_sum():
    funcs = {"a": lambda c, e: [1.0, 0.0, 2.0], "b": lambda c, e: np.array([0.5, 0.5, -1.0])}
    total, per_func, valid = rewards.RewardSet(funcs, (2.0, -1.0))(["x"] * 3, [{}] * 3)
    np.testing.assert_allclose(total, [1.5, -0.5, 5.0])
    np.testing.assert_allclose(per_func["b"], [0.5, 0.5, -1.0])
    assert valid.all()
    total, _, _ = rewards.RewardSet(funcs)(["x"] * 3, [{}] * 3)
    np.testing.assert_allclose(total, [1.5, 0.5, 1.0])


def _raises(c, e):
    raise RuntimeError("boom\nsecond line")


@pytest.mark.parametrize(
    "fn, message",
    [
        (_raises, "reward function 'bad' failed: RuntimeError: boom second line"),
        (lambda c, e: [1.0], "reward function 'bad' failed: ValueError: returned 1 values for 2 completions"),
        (lambda c, e: [1.0, float("nan")], "reward function 'bad' returned nan for completion 1"),
        (lambda c, e: "11", "reward function 'bad' failed: TypeError: returned str"),
    ],
)
def test_a_failing_reward_function_is_one_line_naming_it_or_a_skip(fn, message):
    funcs = {"ok": lambda c, e: [1.0, 1.0], "bad": fn}
    with pytest.raises(rewards.RewardError) as info:
        rewards.RewardSet(funcs)(["x", "y"], [{}, {}])
    assert message in str(info.value) and "\n" not in str(info.value)
    total, _, valid = rewards.RewardSet(funcs, on_error="skip")(["x", "y"], [{}, {}])
    expected_valid = [True, False] if "nan" in message else [False, False]
    assert valid.tolist() == expected_valid
    assert np.isfinite(total).all()


def test_reward_model_function_scores_prompt_plus_completion_ids():
    cfg = tiny()
    graphdef, params = nnx.split(ScalarModel(cfg, nnx.Rngs(3)))
    scorer = RewardScorer(graphdef, params, batch_size=4)
    extras = [
        {"prompt_ids": [2, 5, 6], "completion_ids": [7, 8, 9]},
        {"prompt_ids": [2, 5], "completion_ids": [11]},
    ]
    got = rewards.reward_model_fn(scorer)(["", ""], extras)
    want = scorer.score([[2, 5, 6, 7, 8, 9], [2, 5, 11]])
    np.testing.assert_array_equal(np.float32(got), want)
    assert got[0] != got[1]


def test_config_checks_name_the_key():
    for kwargs, key in [
        ({"num_generations": 1}, "grpo.num_generations=1"),
        ({"reward_funcs": ("answer", "nope")}, "grpo.reward_funcs has 'nope'"),
        ({"reward_weights": (1.0,)}, "grpo.reward_weights=(1.0,)"),
        ({"reward_funcs": ("reward_model",)}, "grpo.reward_model=''"),
        ({"temperature": 0.0}, "grpo.temperature=0.0"),
        ({"overlong_buffer": 32}, "grpo.overlong_buffer=32"),
    ]:
        with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
            GrpoConfig(**kwargs)


# --- the step ------------------------------------------------------------------------------------------------------

CFG = tiny()
# eps=1e-4: Adam divides by sqrt(v) + eps, so with the default 1e-8 a near-zero gradient's update is its sign and
# float summation-order noise (another mesh) becomes a full-size difference; the invariant under test is the gradient.
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_norm=0.0, eps=1e-4)


SAMPLE_STATIC = ("max_new_tokens", "temperature", "eos_ids", "num_generations")


def _rollout_batch(G=4, P=4, W=6, C=8, seed=0):
    """A real generation batch of the tiny model: P random prompts of different lengths, G samples each."""
    rng = np.random.default_rng(seed)
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0)))
    prompts = [rng.integers(4, CFG.vocab_size, size=n).tolist() for n in rng.integers(2, W + 1, size=P)]
    ids, mask = sampler._left_pad(prompts, 0, CFG.vocab_size)
    out = jax.jit(functools.partial(sampler.sample, graphdef), static_argnames=SAMPLE_STATIC)(
        params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
        max_new_tokens=C, temperature=1.0, eos_ids=(3,), num_generations=G,
    )  # fmt: skip
    batch = {
        "prompt_ids": out.prompt_ids,
        "prompt_mask": out.prompt_mask,
        "completion_ids": out.tokens,
        "completion_mask": out.mask,
        "advantages": jnp.asarray(rng.normal(size=P * G), jnp.float32),
        "sampler_logps": out.logps,
    }
    return graphdef, params, {k: np.asarray(v) for k, v in batch.items()}


def _step(cfg, batch, microbatches=1, rules=None, ref_seed=None):
    graphdef, params = nnx.split(Transformer(CFG, nnx.Rngs(0), rules))
    if rules is None:
        rules = rules_for(1, fsdp=1)
    state, shardings = state_lib.create_sharded(graphdef, params, OPTIM, 10, 0, rules)
    ref = None
    if ref_seed is not None:
        ref = nnx.split(Transformer(CFG, nnx.Rngs(ref_seed)))[1]
    step = jax.jit(functools.partial(grpo.train_step, cfg=cfg, optim=OPTIM, microbatches=microbatches))
    shardings = grpo.batch_shardings(rules)
    placed = {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    return step(state, placed, ref)


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])
def test_step_loss_equals_grpo_loss(loss_type, level):
    graphdef, params, batch = _rollout_batch()
    cfg = GrpoConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.1, max_completion_length=8)
    _, metrics = _step(cfg, batch, ref_seed=7)
    ref_params = nnx.split(Transformer(CFG, nnx.Rngs(7)))[1]
    logps = grpo.policy_logps(params, graphdef, batch, cfg)
    ref = grpo.policy_logps(ref_params, graphdef, batch, cfg)
    loss, weight, m = losses.grpo_loss(
        logps, None, ref, batch["advantages"], batch["completion_mask"],
        beta=0.1, loss_type=loss_type, max_completion_length=8, importance_sampling_level=level,
    )  # fmt: skip
    np.testing.assert_allclose(metrics["loss"], loss / weight, rtol=1e-5)
    kl = losses.finalize_metrics(m, weight)["kl"]
    assert kl > 1e-3
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    # The sampler's log-probs of its own tokens agree with the trainer's recomputation.
    assert float(metrics["logps/sampler_max_abs_diff"]) < 1e-4


def _params_after(cfg, batch, microbatches, rules=None):
    state, metrics = _step(cfg, batch, microbatches, rules)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)], metrics


def test_grad_accum_and_data_parallel_mesh_give_the_same_update():
    _, _, batch = _rollout_batch(P=4, G=4)
    # Two clipped updates per batch: the old log-probs and the second update are covered too.
    cfg = GrpoConfig(num_iterations=2, max_completion_length=8)
    one, m1 = _params_after(cfg, batch, 1)
    two, m2 = _params_after(cfg, batch, 2)
    mesh, m3 = _params_after(cfg, batch, 2, rules_for(4, data=2, fsdp=2))
    for a, b, c in zip(one, two, mesh, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-5)
    assert not np.allclose(
        one[0], np.asarray(jax.tree.leaves(nnx.split(Transformer(CFG, nnx.Rngs(0)))[1])[0])
    )


def test_padding_columns_trimmed_by_the_rollout_leave_the_update_unchanged():
    _, _, batch = _rollout_batch(P=4, G=4)
    cfg = GrpoConfig(beta=0.1, max_completion_length=16)
    # The same rows with 10 more left-padding columns on the prompts and 8 more unused completion columns: what a
    # batch looked like before `rollout.bucket_width` trimmed it.
    wide = dict(batch)
    for k in ("prompt_ids", "prompt_mask"):
        wide[k] = np.pad(batch[k], ((0, 0), (10, 0)))
    for k in ("completion_ids", "completion_mask", "sampler_logps"):
        wide[k] = np.pad(batch[k], ((0, 0), (0, 8)))
    (trimmed, m1), (padded, m2) = (_step(cfg, b, ref_seed=7) for b in (batch, wide))
    for a, b in zip(jax.tree.leaves(trimmed.params), jax.tree.leaves(padded.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5)


def test_bucket_width_is_the_next_power_of_two_within_the_cap():
    assert [rollout.bucket_width(n, 64) for n in (0, 1, 8, 9, 16, 17, 33, 64)] == [
        8,
        8,
        8,
        16,
        16,
        32,
        64,
        64,
    ]
    assert [rollout.bucket_width(n, 24) for n in (3, 9, 17, 24)] == [8, 16, 24, 24]
    assert rollout.bucket_width(5, 6) == 6


def test_a_batch_with_every_group_ignored_keeps_the_weights():
    _, params, batch = _rollout_batch()
    batch = {**batch, "completion_mask": np.zeros_like(batch["completion_mask"])}
    state, metrics = _step(GrpoConfig(max_completion_length=8), batch)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(state.step) == 1 and float(metrics["loss"]) == 0.0


# --- groups under micro-batching and sharding ------------------------------------------------------------------------


def test_microbatch_order_puts_whole_groups_in_each_microbatch_and_device():
    B, n, dp, G = 32, 2, 4, 4
    perm = grpo.microbatch_order(B, n)
    group_of_row = (np.arange(B) // G)[perm]  # prompt-major rows, permuted
    micro = group_of_row.reshape(B // n, n).swapaxes(0, 1)  # grad_step's split: rows j, j + n, ...
    for j in range(n):
        for device_rows in micro[j].reshape(dp, -1):  # each device's contiguous share
            counts = np.bincount(device_rows)
            assert set(counts[counts > 0]) == {G}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synthetic.write_world(str(tmp_path_factory.mktemp("world")), 40, seed=1)


@pytest.fixture(scope="module")
def tok(world, tmp_path_factory):
    with open(world["pretrain_train"], encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "sp.model"), 512)


def _config(tmp_path, **sections) -> Config:
    from configs.grpo import get_config

    c = get_config("smoke")
    c.workdir = str(tmp_path)
    for section, values in sections.items():
        c[section].update(values)
    return from_config_dict(c)


def _length_reward(completions, extras):
    return [float(sum(e["completion_ids"]) % 5) for e in extras]


def test_rollout_advantages_are_per_prompt_under_grad_accum_and_a_data_parallel_mesh(tmp_path, world, tok):
    config = _config(
        tmp_path,
        model=dict(vocab_size=512, d_model=32, d_ff=64, head_dim=8),
        train=dict(batch_size=16, grad_accum=2),
        grpo=dict(max_completion_length=8),
    )
    rules = rules_for(2, data=2, fsdp=1)
    grpo.check_groups(config, rules)
    graphdef, params = nnx.split(Transformer(config.model, nnx.Rngs(0), rules))
    state, _ = state_lib.create_sharded(graphdef, params, config.optim, 10, 0, rules)
    reward_set = rewards.RewardSet({"length": _length_reward})
    roll = grpo.Rollout(config, rules, tok, graphdef, reward_set)
    loader = prompt_pipelines.rl_loader(
        world["rl_train"], tok, global_batch_size=4, seed=0, max_prompt_length=96, columns=("answer",)
    )
    prompts = next(loader)
    loader.close()
    batch, metrics = roll(state, prompts, step=1)
    host = {k: np.asarray(v)[np.argsort(roll.perm)] for k, v in batch.items()}  # back to prompt-major
    G = 4
    # The prompts lost only columns no row uses (left padding), down to a power-of-two width.
    longest = int(prompts["prompt_mask"].sum(1).max())
    W = host["prompt_ids"].shape[1]
    assert longest <= W == rollout.bucket_width(longest, 96) < 96
    assert not prompts["prompt_mask"][:, : 96 - W].any()
    for p in range(4):  # every group is one prompt, and its rows are that prompt's
        rows = host["prompt_ids"][p * G : (p + 1) * G]
        assert (rows == prompts["prompt_ids"][p, 96 - W :]).all()
    extras = [
        {"completion_ids": ids[m > 0].tolist()}
        for ids, m in zip(host["completion_ids"], host["completion_mask"], strict=True)
    ]
    rewards_PxG = np.asarray(_length_reward(None, extras)).reshape(4, G)
    assert np.ptp(rewards_PxG, axis=1).max() > 0  # the check below is not vacuous
    np.testing.assert_allclose(
        host["advantages"], np.asarray(losses.grpo_advantages(rewards_PxG)).reshape(-1), rtol=1e-6
    )
    # In the device batch, grad_step's microbatch j holds rows j, j + 2, ...: each device's share is whole groups.
    for j in range(2):
        micro = np.asarray(batch["prompt_ids"])[j::2]
        for share in micro.reshape(2, -1, micro.shape[1]):  # data=2: two devices
            for g in range(share.shape[0] // G):
                assert (share[g * G : (g + 1) * G] == share[g * G]).all()
    assert metrics["reward"] == pytest.approx(rewards_PxG.mean())
    assert 0 <= metrics["completions/clipped_ratio"] <= 1
    assert metrics["completions/mean_length"] == pytest.approx(host["completion_mask"].sum(1).mean())


def test_rollout_skips_the_groups_of_a_failing_reward_and_counts_them(tmp_path, world, tok):
    config = _config(
        tmp_path,
        model=dict(vocab_size=512, d_model=32, d_ff=64, head_dim=8),
        train=dict(batch_size=8),
        data=dict(on_error="skip"),
        grpo=dict(max_completion_length=4),
    )
    rules = rules_for(1, fsdp=1)
    graphdef, params = nnx.split(Transformer(config.model, nnx.Rngs(0), rules))
    state, _ = state_lib.create_sharded(graphdef, params, config.optim, 10, 0, rules)

    def nan_for_first(completions, extras):  # NaN for one completion of the first prompt only
        return [float("nan")] + [1.0] * (len(completions) - 1)

    roll = grpo.Rollout(
        config, rules, tok, graphdef, rewards.RewardSet({"nan": nan_for_first}, on_error="skip")
    )
    loader = prompt_pipelines.rl_loader(
        world["rl_train"], tok, global_batch_size=2, seed=0, max_prompt_length=48
    )
    prompts = next(loader)
    loader.close()
    batch, metrics = roll(state, prompts, step=1)
    host = {k: np.asarray(v)[np.argsort(roll.perm)] for k, v in batch.items()}
    assert metrics["reward_skipped_groups"] == 1
    assert not host["completion_mask"][:4].any() and host["completion_mask"][4:].any()
    assert not host["advantages"].any()  # the other group's rewards are all 1: zero advantage
    assert metrics["frac_reward_zero_std"] == 1.0
    # DAPO's dynamic filtering drops that zero-variance group from the loss too (same sampler program, new option).
    roll.cfg = dataclasses.replace(roll.cfg, filter_zero_std=True)
    batch, metrics = roll(state, prompts, step=1)
    assert not np.asarray(batch["completion_mask"]).any() and metrics["reward_skipped_groups"] == 1


# --- bad input -----------------------------------------------------------------------------------------------------


def test_group_size_must_divide_the_batch_and_each_devices_microbatch(tmp_path):
    config = _config(tmp_path, train=dict(batch_size=10))
    with pytest.raises(ConfigError, match=r"train.batch_size=10 .* not divisible by grpo.num_generations=4"):
        grpo.check_groups(config, rules_for(1, fsdp=1))
    config = _config(tmp_path, train=dict(batch_size=16, grad_accum=2))
    with pytest.raises(
        ConfigError, match=r"grpo.num_generations=4 does not divide the 2 completions .* of 32"
    ):
        grpo.check_groups(config, rules_for(4, data=4, fsdp=1))
    grpo.check_groups(config, rules_for(2, data=2, fsdp=1))


def test_prompt_plus_completion_over_the_model_is_a_config_error(tmp_path):
    config = _config(
        tmp_path, model=dict(max_seq_len=56), train=dict(seq_len=56), grpo=dict(max_completion_length=16)
    )
    with pytest.raises(ConfigError, match=r"data.max_prompt_length=48 \+ grpo.max_completion_length=16 = 64"):
        grpo.check_groups(config, rules_for(1, fsdp=1))


def test_empty_and_overlong_prompts_are_one_line_or_counted(tmp_path, tok):
    path = tmp_path / "rl.jsonl"
    records = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "", "answer": "0"}]
    records.append({"prompt": "word " * 200, "answer": "x"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    kwargs = dict(global_batch_size=1, seed=0, max_prompt_length=48, shuffle=False, overlong="reject")
    loader = prompt_pipelines.rl_loader(str(path), tok, **kwargs)
    with pytest.raises(DataError, match=r"rl.jsonl:2: field 'prompt' is empty"):
        next(loader), next(loader)  # the reader runs ahead: the error may come with the first batch
    loader.close()
    loader = prompt_pipelines.rl_loader(str(path), tok, **{**kwargs, "on_error": "skip", "num_epochs": 1})
    got = list(loader)
    assert len(got) == 1 and got[0]["extras"][0]["answer"] == "2"
    assert loader.counts["skipped"] == 2  # the empty and the over-long prompt
    loader.close()
    path.write_text(json.dumps(records[2]) + "\n")
    with pytest.raises(
        DataError, match=r"rl.jsonl:1: the prompt has \d+ tokens, over data.max_prompt_length=48"
    ):
        next(prompt_pipelines.rl_loader(str(path), tok, **kwargs))


def _even_token_reward(completions, extras):
    """Dense and token-level: the share of even token ids in the completion (~0.5 for a random-init model)."""
    return [float(np.mean([t % 2 == 0 for t in e["completion_ids"]])) for e in extras]


def test_grpo_steps_raise_the_mean_reward(tmp_path, world, tok):
    """A measured improvement, not "it runs": 12 GRPO steps (sampling, scoring, group advantages, the jitted DAPO
    update) from a random-init tiny model raise a dense reward well above where it starts."""
    config = _config(
        tmp_path,
        model=dict(vocab_size=512, d_model=32, d_ff=64, head_dim=8),
        train=dict(batch_size=32, grad_accum=1),
        optim=dict(lr=3e-2, warmup_steps=0, weight_decay=0.0),
        grpo=dict(max_completion_length=8, num_generations=4, beta=0.0),
    )
    rules = rules_for(1)
    graphdef, params = nnx.split(Transformer(config.model, nnx.Rngs(0), rules))
    state, _ = state_lib.create_sharded(graphdef, params, config.optim, 100, 0, rules)
    roll = grpo.Rollout(config, rules, tok, graphdef, rewards.RewardSet({"even": _even_token_reward}))
    step_fn = jax.jit(
        functools.partial(grpo.train_step, cfg=config.grpo, optim=config.optim, microbatches=1),
        donate_argnums=0,
    )
    loader = prompt_pipelines.rl_loader(
        world["rl_train"], tok, global_batch_size=8, seed=0, max_prompt_length=48, columns=("answer",)
    )
    rewards_per_step = []
    for step in range(1, 13):
        batch, metrics = roll(state, next(loader), step=step)
        rewards_per_step.append(metrics["reward"])
        state, _ = step_fn(state, batch, None)
    loader.close()
    first, last = np.mean(rewards_per_step[:3]), np.mean(rewards_per_step[-3:])
    assert 0.3 < first < 0.7, rewards_per_step  # the random policy's level
    assert last > first + 0.2, rewards_per_step


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_policy_update_equals_one_device(schedule):
    """The RL policy update with the layers pipelined over `stage` (GPipe or 1F1B, 2 stages x fsdp 2 x tensor 2; the
    layers then stacked) gives the one-device update: two clipped iterations, old log-probs and all."""
    _, _, batch = _rollout_batch(P=4, G=4)
    cfg = GrpoConfig(num_iterations=2, max_completion_length=8)
    s1, m1 = _step(cfg, batch)
    s2, m2 = _step(cfg, batch, rules=rules_for(8, schedule=schedule, stage=2, fsdp=2, tensor=2))
    one = {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(s1.params)}
    piped = {tuple(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(s2.params)}
    assert len(piped) < len(one)  # stacked layers
    for path, value in piped.items():
        if path[0] == "blocks":  # one stacked leaf per per-layer leaf of the unpipelined model
            want = np.stack([one[(path[0], str(i), *path[1:])] for i in range(CFG.n_layers)])
        else:
            want = one[path]
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=str(path))
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)


_BUCKET_SCRIPT = """
import sys
from jaxalign.parallel import distributed
distributed.maybe_initialize()
import jax
from jaxalign.stages import rollout
print("width", rollout.bucket_width([5, 20][jax.process_index()], 64), flush=True)
"""


def test_every_process_trims_to_the_same_width():
    # Two processes whose rows use 5 and 20 columns: both keep 32 (the global arrays they build must agree).
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUCKET_SCRIPT],
            cwd=ROOT,
            env=launch_env(JAX_PLATFORMS="cpu", **cluster_env("explicit", 2, i, port)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert [re.findall(r"^width (\d+)$", out, re.M) for out, _ in outs] == [["32"], ["32"]]
