"""A policy under evaluation: batched greedy/sampled answers to chat prompts, and teacher-forced log-likelihoods.

    policy = Policy(model, tokenizer, template="chatml", batch_size=16)
    gens = generate(policy, prompts, max_new_tokens=32)          # greedy by default
    gens.texts                                                   # decoded up to (without) the end of turn
    logps = continuation_logps(policy, [(context_ids, continuation_ids), ...])   # list of [C_i] float32
    kl = kl_to_ref(policy, reference, prompts, estimator="k3")   # {"kl_to_ref": ..., "kl_estimator": "k3"}

Every call runs on fixed shapes so few programs compile: rows in batches of `batch_size` (the last batch filled with
copies of its first row, dropped afterwards), prompt and continuation widths rounded up to a multiple of `BUCKET`.
Generation goes through `rl.sampler.generate` (KV cache, the model's own mesh); log-likelihoods through
`rl.sampler.completion_logps` at temperature 1 (the model's own distribution), the function RL stages train with.

Shape legend: B rows, P prompt width (left-padded), C completion/continuation width (right-padded).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign.data import chat
from jaxalign.errors import ConfigError, DataError
from jaxalign.eval import metrics
from jaxalign.models.transformer import Transformer
from jaxalign.rl import sampler

BUCKET = 32

Messages = list[dict[str, str]]


@dataclasses.dataclass
class Policy:
    """A chat model under evaluation: an nnx `Transformer`, its tokenizer and chat template. `batch_size` rows are
    generated or scored at a time; on a mesh it must be a multiple of the data-parallel size."""

    model: Transformer
    tokenizer: Any
    template: str = "chatml"
    batch_size: int = 16

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The conversation rendered with the assistant header appended (ready to sample the answer)."""
        return chat.render(self.tokenizer, messages, self.template, add_generation_prompt=True)[0]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return chat.stop_ids(self.tokenizer, self.template)


@dataclasses.dataclass
class Generations:
    """Answers to N prompts: texts decoded up to (without) the first stop id, and the sampler's arrays."""

    texts: list[str]
    tokens_NxC: np.ndarray  # int32, pad after the stop token
    mask_NxC: np.ndarray  # int32, 1 up to and including the stop token
    prompt_ids_NxP: list[np.ndarray]  # per row (widths differ between batches)
    prompt_mask_NxP: list[np.ndarray]


def _round_up(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _batches(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """(row indices, number of real rows) per batch; the last batch is filled up with copies of its first row,
    whose results are dropped."""
    out = []
    for start in range(0, n, batch_size):
        rows = list(range(start, min(n, start + batch_size)))
        out.append((rows + [rows[0]] * (batch_size - len(rows)), len(rows)))
    return out


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = _round_up(max(len(r) for r in rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r) :], mask[b, width - len(r) :] = r, 1
    return ids, mask


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = _round_up(max(len(r) for r in rows))
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    return ids, mask


def decode_answer(tokenizer: Any, tokens_C: np.ndarray, stop_ids: Sequence[int]) -> str:
    """The text of one completion up to (without) its first stop id."""
    ids = [int(t) for t in tokens_C]
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids)


def generate(
    policy: Policy,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
) -> Generations:
    """The policy's answers to chat `prompts` (message lists), greedy unless `temperature` > 0; each batch is
    sampled with `fold_in(key(seed), batch index)`."""
    if not prompts:
        raise DataError("generate: no prompts to answer")
    rules = policy.model.rules
    if rules is not None and policy.batch_size % rules.data_parallel_size:
        raise ConfigError(
            f"eval.batch_size={policy.batch_size} is not divisible by the data-parallel size "
            f"{rules.data_parallel_size} of the model's mesh {dict(rules.mesh.shape)}"
        )
    tok, stops = policy.tokenizer, policy.stop_ids
    rows = [policy.prompt_ids(m) for m in prompts]
    n = len(rows)
    tokens = np.zeros((n, max_new_tokens), np.int32)
    mask = np.zeros((n, max_new_tokens), np.int32)
    p_ids: list[np.ndarray] = [np.zeros(0, np.int32)] * n
    p_mask: list[np.ndarray] = [np.zeros(0, np.int32)] * n
    for i, (idx, real) in enumerate(_batches(n, policy.batch_size)):
        ids_BxP, mask_BxP = _left_pad([rows[j] for j in idx], tok.pad_id)
        out = sampler.generate(
            policy.model,
            {"prompt_ids": ids_BxP, "prompt_mask": mask_BxP},
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            eos_id=stops,
            rng=jax.random.fold_in(jax.random.key(seed), i),
            pad_id=tok.pad_id,
        )
        t_BxC, m_BxC = np.asarray(out.tokens), np.asarray(out.mask)
        for b, j in enumerate(idx[:real]):
            tokens[j], mask[j], p_ids[j], p_mask[j] = t_BxC[b], m_BxC[b], ids_BxP[b], mask_BxP[b]
    texts = [decode_answer(tok, tokens[j], stops) for j in range(n)]
    return Generations(texts, tokens, mask, p_ids, p_mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logps(graphdef, params, prompt_ids_BxP, prompt_mask_BxP, ids_BxC, mask_BxC):
    return sampler.completion_logps(
        graphdef, params, prompt_ids_BxP, prompt_mask_BxP, ids_BxC, mask_BxC, temperature=1.0
    )


def continuation_logps(
    model: Transformer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, pad_id: int = 0
) -> list[np.ndarray]:
    """Teacher-forced log-probs (nats) of each continuation's tokens given its context: [len(continuation)]
    float32 per pair. Contexts must be non-empty (the first continuation token is predicted from them)."""
    for i, (context, continuation) in enumerate(pairs):
        if not len(context) or not len(continuation):
            raise DataError(f"pair {i}: context and continuation must both be non-empty token lists")
        if len(context) + len(continuation) > model.cfg.max_seq_len:
            raise DataError(
                f"pair {i}: {len(context)} + {len(continuation)} tokens exceed model.max_seq_len="
                f"{model.cfg.max_seq_len}"
            )
    graphdef, params = nnx.split(model)
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(pairs)
    for idx, real in _batches(len(pairs), batch_size):
        ctx_BxP, ctx_mask_BxP = _left_pad([pairs[j][0] for j in idx], pad_id)
        ids_BxC, mask_BxC = _right_pad([pairs[j][1] for j in idx], pad_id)
        logps_BxC = np.asarray(_logps(graphdef, params, ctx_BxP, ctx_mask_BxP, ids_BxC, mask_BxC))
        for b, j in enumerate(idx[:real]):
            out[j] = logps_BxC[b, : len(pairs[j][1])]
    return out


def perplexity(model: Transformer, tokenizer: Any, texts: Sequence[str], batch_size: int) -> dict[str, float]:
    """Token-weighted perplexity of held-out `texts`, each scored as [bos] + its ids (cut to the model's
    max_seq_len): {"perplexity", "nll_per_token", "tokens"}."""
    limit = model.cfg.max_seq_len - 1
    pairs = [([tokenizer.bos_id], tokenizer.encode(t)[:limit]) for t in texts if t.strip()]
    if not pairs:
        raise DataError("perplexity: every held-out text is empty")
    logps = continuation_logps(model, pairs, batch_size, tokenizer.pad_id)
    nll, count = -float(sum(x.sum(dtype=np.float64) for x in logps)), sum(len(x) for x in logps)
    return {
        "perplexity": metrics.perplexity(nll, count),
        "nll_per_token": nll / count,
        "tokens": float(count),
    }


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef"))
def _pair_logps(
    graphdef, params, ref_graphdef, ref_params, prompt_ids_BxP, prompt_mask_BxP, ids_BxC, mask_BxC
):
    logps = sampler.completion_logps(
        graphdef, params, prompt_ids_BxP, prompt_mask_BxP, ids_BxC, mask_BxC, temperature=1.0
    )
    ref = sampler.completion_logps(
        ref_graphdef, ref_params, prompt_ids_BxP, prompt_mask_BxP, ids_BxC, mask_BxC, temperature=1.0
    )
    return logps, ref


def kl_to_ref(
    policy: Policy,
    reference: Transformer,
    prompts: Sequence[Messages],
    *,
    estimator: str = "k3",
    max_new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean per-sequence KL(policy || reference) in nats on the policy's own samples (temperature 1): for each
    prompt one completion is sampled, both models' teacher-forced log-probs are computed on it, and Schulman's
    `estimator` ("k1" or "k3") is summed over its tokens. Returns {"kl_to_ref", "kl_estimator"}."""
    if estimator not in metrics.KL_ESTIMATORS:
        raise ConfigError(f"eval.kl_estimator={estimator!r} is not one of {list(metrics.KL_ESTIMATORS)}")
    if reference.cfg.vocab_size != policy.model.cfg.vocab_size:
        raise ConfigError(
            f"eval.reference: vocab_size {reference.cfg.vocab_size} differs from the policy's "
            f"{policy.model.cfg.vocab_size}; KL needs the same tokenizer"
        )
    gens = generate(policy, prompts, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    graphdef, params = nnx.split(policy.model)
    ref_graphdef, ref_params = nnx.split(reference)
    kls = []
    for idx, real in _batches(len(prompts), policy.batch_size):
        rows = [np.asarray(gens.prompt_ids_NxP[j])[gens.prompt_mask_NxP[j] > 0] for j in idx]
        p_BxP, pm_BxP = _left_pad(rows, policy.tokenizer.pad_id)
        logps, ref = _pair_logps(
            graphdef,
            params,
            ref_graphdef,
            ref_params,
            p_BxP,
            pm_BxP,
            gens.tokens_NxC[idx],
            gens.mask_NxC[idx],
        )
        kl_B = metrics.sequence_kl(np.asarray(logps), np.asarray(ref), gens.mask_NxC[idx], estimator)
        kls.extend(kl_B[:real])
    return {"kl_to_ref": float(np.mean(kls)), "kl_estimator": estimator}
