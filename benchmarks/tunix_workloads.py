"""Tunix 0.1.7 on jaxalign's reference workloads (the Tunix half of benchmarks/compare_tunix.py).

    <tunix venv>/bin/python benchmarks/tunix_workloads.py --workload sft|dpo|generate|grpo [--steps 10]

Importable only where `google-tunix==0.1.7` is installed (its own venv); jaxalign and its tests never import it.
Model: Tunix's own `tunix.models.llama3.model.Llama3` configured to the reference shapes of
benchmarks/train_throughput.py (vocab 8192, d_model 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024, untied
embeddings, float32 parameters and activations, one CPU device). Tunix initialises the MLP kernels to zeros; they
are re-drawn from a normal so that no step runs on all-zero weights. Optimizer as jaxalign's OptimConfig
(clip 1.0 + AdamW b2 0.95, weight decay 0.1; lr 1e-3 after 10 warm-up steps, GRPO: 1e-5 constant as in
benchmarks/grpo_bench.py). Every Tunix piece the brief names ran on this CPU; nothing is stubbed.

Workloads, each timed as jaxalign's benchmark of the same row times its own (compile excluded: one warm-up call,
then the median of `--steps` blocked calls):
  sft       `PeftTrainer` (full fine-tuning, `wrt=nnx.Param`), its jitted train step (`jit_train_and_eval_step`,
            the function `PeftTrainer.train` calls) with its default loss on 8 x 256 tokens, the loss mask on the
            last 3/4 (`input_mask`), causal attention mask and positions built by `tunix.sft.utils`.
  dpo       `DPOTrainer` with a live reference model (a copy of the policy), 8 pairs of 64 prompt + 192 completion
            tokens as `dpo_trainer.TrainingInput`; one step = `_prepare_inputs` (the reference's jitted log-probs,
            as `train` does) + the jitted train step; tokens counted as jaxalign counts them (chosen + rejected).
  generate  `tunix.generate.sampler.Sampler` (Tunix's own KV-cache sampler, the "vanilla" rollout engine),
            8 prompts of 32 tokens, 128 greedy new tokens, no EOS reachable. Prefill and the decode loop are the
            two jitted programs `Sampler.__call__` runs (`_compiled_prefill_fn`, `_compiled_decode_fn`), timed
            apart as benchmarks/generate_bench.py times jaxalign's; `call_s` is the whole public `Sampler.__call__`
            (host tokenisation and detokenisation included).
  grpo      `GRPOLearner` on an `RLCluster` (vanilla rollout, actor = rollout on one mesh, live reference,
            beta 0.04, Tunix's default `grpo` policy loss; jaxalign's bench uses its dapo loss, the same
            forward/backward work), 2 prompts x 4 generations, prompt 32, 64 new tokens at temperature 1, one update per step;
            the reward is a cheap function of the completion's tokens. A step's time is the interval between
            consecutive reward calls (one per step: with actor and rollout on one mesh the loop is synchronous, so
            it covers the reference's log-probs, advantages, the update and the next rollout); `--steps` + 2 steps
            run, the first interval (the update's compile) is dropped, the median of the other `--steps`.
Tokenizer: Tunix's sampler takes strings, so a whitespace-separated-integers tokenizer (`IdTokenizer`) stands in;
pad id 0 (prompt tokens are drawn from 1..8191), EOS id 8192 (outside the vocabulary, so no row stops early).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import utils as sft_utils

VOCAB, D_MODEL, LAYERS, HEADS, KV_HEADS, HEAD_DIM, D_FF = 8192, 256, 4, 4, 2, 64, 1024
EOS_ID = VOCAB  # never sampled: logits cover ids 0..VOCAB-1


class IdTokenizer:
    """Whitespace-separated integer ids <-> strings, the tokenizer interface Tunix's sampler asks for."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in str(text).split()]

    def decode(self, ids: list[int], **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 0  # falsy: Tunix prepends no BOS

    def eos_id(self) -> int:
        return EOS_ID

    def pad_id(self) -> int:
        return 0


def make_model(seed: int = 0) -> llama3.Llama3:
    """Tunix's Llama3 at the reference shapes, float32, MLP kernels re-drawn (Tunix initialises them to 0)."""
    cfg = llama3.ModelConfig(
        num_layers=LAYERS,
        vocab_size=VOCAB,
        embed_dim=D_MODEL,
        hidden_dim=D_FF,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS,
        rope_theta=10_000,
        norm_eps=1e-5,
    )
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for i, layer in enumerate(model.layers):
        for j, lin in enumerate((layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)):
            shape = lin.kernel.get_value().shape
            lin.kernel.set_value(
                0.02 * jax.random.normal(jax.random.fold_in(key, 3 * i + j), shape, jnp.float32)
            )
    return model


def optimizer() -> optax.GradientTransformation:
    """jaxalign's OptimConfig(lr=1e-3, warmup_steps=10) as optax: clip 1.0, AdamW(0.9, 0.95, wd 0.1)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 1000, 1e-4)
    return optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    )


def timed(fn, steps: int) -> tuple[float, list[float]]:
    """(first call's seconds, compiles included; the `steps` following calls' seconds), each call blocked on."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, times


def run_sft(steps: int) -> dict:
    from tunix.sft import peft_trainer

    B, T = 8, 256
    model = make_model()
    trainer = peft_trainer.PeftTrainer(
        model, optimizer(), peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**6)
    )

    def gen_model_input(x: peft_trainer.TrainingInput) -> dict:
        return {
            "input_tokens": x.input_tokens,
            "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(jnp.ones_like(x.input_mask)),
            "attention_mask": sft_utils.make_causal_attn_mask(jnp.ones_like(x.input_mask)),
        }

    trainer.with_gen_model_input_fn(gen_model_input)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    rng = np.random.default_rng(0)
    mask = np.ones((B, T), np.bool_)
    mask[:, : T // 4] = False
    example = peft_trainer.TrainingInput(
        input_tokens=jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32), input_mask=jnp.asarray(mask)
    )
    out = {}

    def step():
        out["loss"], _, _ = train_step(example)
        return out["loss"]

    first, times = timed(step, steps)
    step_s = float(np.median(times))
    return {
        "tokens_per_s": B * T / step_s,
        "step_s": step_s,
        "first_step_s": first,
        "loss": float(out["loss"]),
    }


def run_dpo(steps: int) -> dict:
    from tunix.sft.dpo import dpo_trainer

    B, P, C = 8, 64, 192
    model = make_model()
    ref = copy.deepcopy(model)
    trainer = dpo_trainer.DPOTrainer(
        model,
        ref,
        optimizer(),
        dpo_trainer.DPOTrainingConfig(eval_every_n_steps=10**9, max_steps=10**6, beta=0.1),
    )
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    rng = np.random.default_rng(0)

    def ids(n):
        return jnp.asarray(rng.integers(1, VOCAB, (B, n)), jnp.int32)

    inp = dpo_trainer.TrainingInput(
        prompt_ids=ids(P),
        prompt_mask=jnp.ones((B, P), jnp.int32),
        chosen_ids=ids(C),
        chosen_mask=jnp.ones((B, C), jnp.int32),
        rejected_ids=ids(C),
        rejected_mask=jnp.ones((B, C), jnp.int32),
    )
    out = {}

    def step():
        example = trainer._prepare_inputs(inp)  # the reference's log-probs, as PeftTrainer.train does
        out["loss"], _, _ = train_step(example)
        return out["loss"]

    first, times = timed(step, steps)
    step_s = float(np.median(times))
    tokens = 2 * B * (P + C)
    return {
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "first_step_s": first,
        "loss": float(out["loss"]),
    }


def run_generate(steps: int) -> dict:
    from tunix.generate import sampler as sampler_lib

    B, P, C = 8, 32, 128
    model = make_model()
    sampler = sampler_lib.Sampler(
        model,
        IdTokenizer(),
        sampler_lib.CacheConfig(
            cache_size=P + C, num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM
        ),
    )
    prompts_BxP = np.random.default_rng(0).integers(1, VOCAB, (B, P))
    strings = [" ".join(map(str, row)) for row in prompts_BxP]

    def call():
        return sampler(
            strings, max_generation_steps=C, max_prompt_length=P, temperature=0.0, eos_tokens=[EOS_ID]
        )

    start = time.perf_counter()
    result = call()
    first_call_s = time.perf_counter() - start
    assert all(len(t) == C for t in result.tokens), "a row stopped early"
    call_times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        call_times.append(time.perf_counter() - start)

    # The two jitted programs of Sampler.__call__, timed apart (as generate_bench.py times jaxalign's).
    sampler.eos_ids = jnp.array([EOS_ID])
    prefill_times, decode_times = [], []
    for _ in range(steps):
        state = sampler.init_sample_state(
            jnp.asarray(prompts_BxP, jnp.int32),
            total_sampling_steps=P + C,
            include_logits=False,
            forbidden_token_ids=None,
            temperature=0.0,
            top_p=None,
            top_k=None,
            seed=jax.random.PRNGKey(0),
            beam_size=None,
        )
        jax.block_until_ready(state.token_buffer)
        start = time.perf_counter()
        state = sampler._compiled_prefill_fn(sampler._flattened_transformer_state, state, None, echo=False)
        jax.block_until_ready(state.token_buffer)
        prefill_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = sampler._compiled_decode_fn(sampler._flattened_transformer_state, state)
        jax.block_until_ready(state.token_buffer)
        decode_times.append(time.perf_counter() - start)
    tokens_BxC = np.asarray(state.token_buffer)[:, P:]
    assert (tokens_BxC == np.stack(result.tokens)).all(), "timed programs differ from Sampler.__call__"
    prefill_s, decode_s = float(np.median(prefill_times)), float(np.median(decode_times))
    return {
        "decode_tokens_per_s": B * C / decode_s,
        "prefill_tokens_per_s": B * P / prefill_s,
        "decode_step_ms": decode_s / C * 1e3,
        "call_s": float(np.median(call_times)),
        "first_call_s": first_call_s,
    }


def run_grpo(steps: int) -> dict:
    from jax.sharding import Mesh
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    N_PROMPTS, G, P, C = 2, 4, 32, 64
    model = make_model()
    ref = copy.deepcopy(model)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))
    roles = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.chain(
                optax.clip_by_global_norm(1.0),
                optax.adamw(1e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
            ),
            eval_every_n_steps=10**9,
            max_steps=steps + 2,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=C,
            max_prompt_length=P,
            kv_cache_size=P + C,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            eos_tokens=[EOS_ID],
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=model, reference=ref, tokenizer=IdTokenizer(), cluster_config=cluster_config
    )
    reward_times: list[float] = []

    def reward(prompts, completions, **_):
        reward_times.append(time.perf_counter())
        assert all(len(c.split()) == C for c in completions), "a completion stopped early"
        return [float(sum(int(t) for t in c.split()) % 7) for c in completions]

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=G, num_iterations=1, beta=0.04, epsilon=0.2),
        reward_fns=reward,
    )
    rng = np.random.default_rng(0)
    data = [
        # a numpy array, as a Grain batch is: the learner repeats each leaf G times (a list's leaf is one string)
        {"prompts": np.array([" ".join(map(str, rng.integers(1, VOCAB, P))) for _ in range(N_PROMPTS)])}
        for _ in range(steps + 2)
    ]
    start = time.perf_counter()
    learner.train(data)
    total_s = time.perf_counter() - start
    assert len(reward_times) == steps + 2, f"{len(reward_times)} reward calls for {steps + 2} steps"
    intervals = np.diff(reward_times)[1:]  # the first interval holds the update's compile
    return {
        "s_per_step": float(np.median(intervals)),
        "first_rewards_s": reward_times[0] - start,  # the first rollout, compiles included
        "total_s": total_s,
        "train_steps": int(cluster.actor_trainer.train_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["sft", "dpo", "generate", "grpo"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = {"sft": run_sft, "dpo": run_dpo, "generate": run_generate, "grpo": run_grpo}[args.workload](
        args.steps
    )
    result = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}
    from importlib.metadata import version

    result.update(
        workload=args.workload,
        tunix=version("google-tunix"),
        jax=jax.__version__,
        load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    print(f"Tunix {result['tunix']} {args.workload} on {jax.devices()[0].device_kind}")
    for k, v in result.items():
        print(f"  {k:<22} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
