"""Scalar heads on the transformer trunk: the reward model (Bradley-Terry) and the PPO value model.

    model = ScalarModel(cfg, nnx.Rngs(0), rules)
    scores_BxT = model.scores(tokens_BxT, positions_BxT, segment_ids_BxT)   # one scalar per position
    rewards_B = last_scores(scores_BxT, segment_ids_BxT)                      # at each row's last real token

The trunk is the one `Transformer` (without its vocabulary projection), so a reward or value model starts from any
policy checkpoint (`model.init_from="ckpt:..."` or `"hf:..."`): the trunk's weights are loaded and the head starts at
random (normal, std `init_std`; zero bias). A reward is read at the last real token of a row, as Hugging Face's
`*ForSequenceClassification` does; a value is read at every position.

`RewardScorer` wraps a trained reward model as a reusable scorer: `score(texts or token id lists) -> rewards`, for
PPO, evaluation and best-of-n.

Shape legend: B rows, T length, N = B * T, D d_model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.config import ModelConfig
from jaxalign.models.transformer import Transformer
from jaxalign.parallel.mesh import Rules


class ScalarModel(nnx.Module):
    """Transformer trunk + a linear head D -> 1 (with a bias, zero at init)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, rules: Rules | None = None):
        self.cfg = cfg
        self.trunk = Transformer(cfg, rngs, rules, lm_head=False)
        self.head = nnx.Param(
            cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model,), jnp.float32), axes=("embed",)
        )
        self.head_bias = nnx.Param(jnp.zeros((), jnp.float32), axes=())

    def scores(
        self,
        tokens_BxT: jax.Array,
        positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
    ) -> jax.Array:
        """A float32 scalar per position: [B, T]."""
        B, T = tokens_BxT.shape
        h_NxD = self.trunk.hidden(tokens_BxT, positions_BxT, segment_ids_BxT)
        s_N = jnp.dot(h_NxD, self.head[...].astype(h_NxD.dtype), preferred_element_type=jnp.float32)
        return (s_N + self.head_bias[...]).reshape(B, T)

    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None) -> jax.Array:
        return self.scores(tokens_BxT, positions_BxT, segment_ids_BxT)


def last_index(segment_ids_BxT: jax.Array) -> jax.Array:
    """Index of each row's last real token (segment id > 0) in a right-padded row: [B] int32."""
    real_BxT = segment_ids_BxT > 0
    T = real_BxT.shape[1]
    return (T - 1 - jnp.argmax(real_BxT[:, ::-1], axis=1)).astype(jnp.int32)


def last_scores(scores_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """Each row's score at its last real token: [B]."""
    return jnp.take_along_axis(scores_BxT, last_index(segment_ids_BxT)[:, None], axis=1)[:, 0]


def full_sequence(inputs_BxT: jax.Array, targets_BxT: jax.Array, segment_ids_BxT: jax.Array):
    """A next-token row (inputs = seq[:-1], targets = seq[1:], right-padded) as the whole sequence [B, T + 1]
    with its positions and segment ids, so a scalar head sees the last token too."""
    tokens = jnp.concatenate([inputs_BxT[:, :1], targets_BxT], axis=1)
    segment_ids = jnp.concatenate([segment_ids_BxT[:, :1], segment_ids_BxT], axis=1)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape) * (
        segment_ids > 0
    )
    return tokens, positions, segment_ids


class RewardScorer:
    """A trained reward model as a function of texts or token ids: `score(xs) -> rewards [len(xs)]` (float32).

    Texts are encoded as [bos] + ids (+ eos), like the preference rows the model was trained on; conversations are
    better passed already rendered to ids with the training chat template. Rows are right-padded into batches of
    `batch_size` with lengths rounded up to a multiple of 64, so few shapes are compiled.
    """

    def __init__(
        self, graphdef: nnx.GraphDef, params: nnx.State, tokenizer: Any = None, batch_size: int = 16
    ):
        self.graphdef, self.params = graphdef, params
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = nnx.merge(graphdef, params).cfg.max_seq_len

        def score(params, tokens_BxT, segment_ids_BxT):
            model = nnx.merge(graphdef, params)
            positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape) * (
                segment_ids_BxT > 0
            )
            return last_scores(model.scores(tokens_BxT, positions, segment_ids_BxT), segment_ids_BxT)

        self._score = jax.jit(score)

    def _ids(self, x: str | Sequence[int]) -> list[int]:
        if isinstance(x, str):
            if self.tokenizer is None:
                raise ValueError("RewardScorer was built without a tokenizer: pass token id lists")
            tok = self.tokenizer
            return [tok.bos_id, *tok.encode(x), tok.eos_id]
        return [int(i) for i in x]

    def score(self, xs: Sequence[str | Sequence[int]]) -> np.ndarray:
        rows = [self._ids(x) for x in xs]
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"RewardScorer.score: input {i} is empty")
            if len(r) > self.max_len:
                raise ValueError(
                    f"RewardScorer.score: input {i} has {len(r)} tokens, over the model's max_seq_len {self.max_len}"
                )
        out = np.zeros(len(rows), np.float32)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            T = min(self.max_len, -(-max(len(r) for r in chunk) // 64) * 64)
            tokens = np.zeros((self.batch_size, T), np.int32)
            segments = np.zeros((self.batch_size, T), np.int32)
            for j, r in enumerate(chunk):
                tokens[j, : len(r)], segments[j, : len(r)] = r, 1
            segments[len(chunk) :, 0] = 1  # padding rows score one token (ignored)
            out[start : start + len(chunk)] = np.asarray(self._score(self.params, tokens, segments))[
                : len(chunk)
            ]
        return out

    __call__ = score
