"""Packed SFT == unpacked: over one epoch of the same conversations, the summed SFT loss, its weight (loss tokens) and
its gradient are the same whether `sft_loader` packs several examples per row or puts one per row (attention never
crosses an example and RoPE positions restart, so packing changes only the layout)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.data import pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.models.transformer import Transformer
from jaxalign.stages import sft
from tests.helpers import rules_for, tiny


def test_packed_sft_loss_and_gradient_equal_unpacked(small_world):
    tok = SentencePieceTokenizer(small_world["tokenizer"])
    graphdef, params = nnx.split(Transformer(tiny(vocab_size=512), nnx.Rngs(0), rules_for(devices=1)))
    loss_and_grad = jax.jit(
        jax.value_and_grad(functools.partial(sft.loss_fn, graphdef=graphdef), has_aux=True)
    )

    def totals(packing):
        loader = pipelines.sft_loader(
            small_world["sft_train"],
            tok,
            seq_len=128,
            global_batch_size=4,
            seed=0,
            shuffle=False,
            num_epochs=1,
            packing=packing,
        )
        loss, weight, grads, batches, most_segments = 0.0, 0.0, None, 0, 0
        for batch in loader:
            (loss_sum, (w, _)), g = loss_and_grad(params, jax.tree.map(jnp.asarray, batch))
            loss, weight = loss + float(loss_sum), weight + float(w)
            g = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
            batches += 1
            most_segments = max(most_segments, int(batch["segment_ids"].max()))
        return loss, weight, grads, batches, most_segments, loader.counts["examples"]

    loss_p, weight_p, grads_p, batches_p, segments_p, examples_p = totals(packing=True)
    loss_u, weight_u, grads_u, batches_u, segments_u, examples_u = totals(packing=False)

    with open(small_world["sft_train"], encoding="utf-8") as f:
        records = sum(1 for line in f if line.strip())
    assert examples_p == examples_u == records
    assert segments_u == 1 and segments_p >= 3 and batches_p <= batches_u // 2  # really packed
    assert weight_p == weight_u > 0  # the same loss tokens
    np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)
    for a, b in zip(grads_p, grads_u, strict=True):
        # Float32 sums in another order: entries that nearly cancel carry rounding of the leaf's largest scale.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    assert max(np.abs(b).max() for b in grads_u) > 0
