"""LoRA through the stages' shared state init (`stages.model_init`): a QLoRA SFT run resumes bitwise from checkpoints that
hold only the adapters and their optimizer state, and DPO's reference is the base with the adapters off (at the first
step policy == reference: the loss is exactly log 2 and the implicit rewards are 0)."""

import dataclasses
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxalign.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    DpoConfig,
    LoraConfig,
    OptimConfig,
    TrainConfig,
)
from jaxalign.peft import lora
from jaxalign.stages import dpo, model_init, sft
from jaxalign.train import state as state_lib
from tests.helpers import rules_for, tiny

# d_model and d_ff multiples of 64: every projection's input splits into NF4 blocks.
MODEL = tiny(vocab_size=512, n_layers=1, d_model=64, n_heads=8, head_dim=8, d_ff=128, scan_layers=True)


def _config(workdir, world, steps, **lora_kw):
    return Config(
        workdir=str(workdir),
        job="sft",
        model=MODEL,
        train=TrainConfig(
            steps=steps, batch_size=8, seq_len=128, log_every=1, progress=False, peak_flops=1e12
        ),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, decay_steps=4),
        data=DataConfig(input=world["sft_train"], tokenizer=world["tokenizer"]),
        checkpoint=CheckpointConfig(every_steps=2, async_save=False),
        lora=LoraConfig(**lora_kw),
    )


def _adapter_bytes(state):
    trainable = lora.split_trainable(state.params)[0]
    return {"/".join(map(str, p)): np.asarray(v[...]).tobytes() for p, v in nnx.to_flat_state(trainable)}


def test_qlora_sft_resumes_bitwise_from_adapter_only_checkpoints(small_world, tmp_path):
    lora_kw = dict(rank=4, alpha=8, dropout=0.1, quantize="nf4")
    straight = sft.run(_config(tmp_path / "a", small_world, 4, **lora_kw))
    sft.run(_config(tmp_path / "b", small_world, 2, **lora_kw))
    resumed = sft.run(_config(tmp_path / "b", small_world, 4, **lora_kw))
    assert resumed.history[0]["step"] == 3  # it did resume
    assert _adapter_bytes(resumed.state) == _adapter_bytes(straight.state)
    np.testing.assert_array_equal(
        [h["loss"] for h in resumed.history], [h["loss"] for h in straight.history if h["step"] > 2]
    )
    # The checkpoint holds the adapters and their Adam moments only: no base weight, no NF4 storage.
    saved = ocp.StandardCheckpointer().restore(tmp_path / "b" / "checkpoints" / "sft" / "4" / "state")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved["params"])]
    assert paths and all("_lora" in p for p in paths), paths
    n_adapter = sum(np.asarray(x).size for x in jax.tree.leaves(saved["params"]))
    n_opt = sum(np.asarray(x).size for x in jax.tree.leaves(saved["opt_state"]) if np.ndim(x) > 0)
    assert n_opt == 2 * n_adapter
    n_base = sum(x.size for x in jax.tree.leaves(lora.split_trainable(straight.state.params)[1]))
    assert n_adapter < n_base / 5
    # A later stage starts from the run's merged weights: its base (the run's own model.init_from) with the restored
    # adapters folded in (NF4 dequantised), exactly what merging the trained model gives.
    later = _config(tmp_path / "c", small_world, 1)
    later = dataclasses.replace(
        later, model=dataclasses.replace(MODEL, init_from=f"ckpt:{tmp_path / 'b' / 'checkpoints' / 'sft'}")
    )
    _, started = model_init.init_params(later, rules_for(devices=1))
    merged = nnx.state(lora.merge(nnx.merge(straight.state.graphdef, straight.state.params)), nnx.Param)
    want = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(merged)}
    got = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(started)}
    assert set(got) == set(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7, err_msg=str(p))
    trained = lora.split_trainable(straight.state.params)[0]
    assert any(np.abs(np.asarray(v[...])).max() > 0 for p, v in nnx.to_flat_state(trained) if p[-1] == "b")


def test_dpo_reference_is_the_base_with_adapters_off(small_world, tmp_path):
    config = dataclasses.replace(
        _config(tmp_path, small_world, 2, rank=4, alpha=8),
        job="dpo",
        data=DataConfig(
            input=small_world["preference_train"], tokenizer=small_world["tokenizer"], max_prompt_length=64
        ),
        dpo=DpoConfig(beta=0.1),
        checkpoint=CheckpointConfig(enabled=False),
    )
    result = dpo.run(config)
    first, second = result.history
    assert first["loss"] == math.log(2) or abs(first["loss"] - math.log(2)) < 1e-7, first
    rewards = [v for k, v in first.items() if k.startswith("rewards/") and "accuracies" not in k]
    assert rewards and all(v == 0.0 for v in rewards), first
    assert abs(second["loss"] - math.log(2)) > 1e-5  # after one update, policy != reference


def test_grpo_lora_step_samples_with_adapters_and_uses_the_base_as_reference():
    """GRPO's step with LoRA: the sampler (KV-cache decode path through the adapters) agrees with the trainer's
    log-probs, and the KL is measured against the base with adapters off (`BaseReference`), as an oracle computes it."""
    import functools

    import jax.numpy as jnp

    from jaxalign import losses
    from jaxalign.config import GrpoConfig
    from jaxalign.models.transformer import init_model
    from jaxalign.rl import sampler
    from jaxalign.stages import grpo

    cfg_model = tiny()
    rules = rules_for(1, fsdp=1)
    graphdef, params = init_model(cfg_model, rules, 0)
    graphdef, params = lora.attach(graphdef, params, LoraConfig(rank=4, alpha=8), rules, seed=0)
    flat = []
    for i, (path, var) in enumerate(nnx.to_flat_state(params)):
        if isinstance(var, lora.LoraParam):
            var = var.replace(0.3 * jax.random.normal(jax.random.key(i), var.shape))
        flat.append((path, var))
    params = nnx.from_flat_state(flat)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg_model.vocab_size, size=n).tolist() for n in (3, 6, 4, 5)]
    ids, mask = sampler._left_pad(prompts, 0, cfg_model.vocab_size)
    out = jax.jit(
        functools.partial(sampler.sample, graphdef),
        static_argnames=("max_new_tokens", "temperature", "eos_ids", "num_generations"),
    )(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), max_new_tokens=8, temperature=1.0,
      eos_ids=(3,), num_generations=4)  # fmt: skip
    batch = {
        "prompt_ids": out.prompt_ids,
        "prompt_mask": out.prompt_mask,
        "completion_ids": out.tokens,
        "completion_mask": out.mask,
        "advantages": jnp.asarray(rng.normal(size=16), jnp.float32),
        "sampler_logps": out.logps,
    }
    cfg = GrpoConfig(beta=0.1, max_completion_length=8)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    state, _ = state_lib.create_sharded(graphdef, params, optim, 10, 0, rules)
    step = jax.jit(functools.partial(grpo.train_step, cfg=cfg, optim=optim, microbatches=1))
    _, metrics = step(state, batch, model_init.BaseReference())
    logps = grpo.policy_logps(params, graphdef, batch, cfg)
    ref = grpo.policy_logps(lora.disabled(params), graphdef, batch, cfg)
    _, weight, m = losses.grpo_loss(
        logps, None, ref, batch["advantages"], batch["completion_mask"], beta=0.1, loss_type="dapo",
        max_completion_length=8, importance_sampling_level="token",
    )  # fmt: skip
    kl = losses.finalize_metrics(m, weight)["kl"]
    assert kl > 1e-3  # the adapters move the policy away from the base
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    assert float(metrics["logps/sampler_max_abs_diff"]) < 1e-4
