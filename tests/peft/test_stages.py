"""LoRA through the stages' shared state init (`stages.common`): a QLoRA SFT run resumes bitwise from checkpoints that
hold only the adapters and their optimizer state, and DPO's reference is the base with the adapters off (at the first
step policy == reference: the loss is exactly log 2 and the implicit rewards are 0)."""

import dataclasses
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
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
from jaxalign.errors import CheckpointError
from jaxalign.peft import lora
from jaxalign.stages import common, dpo, sft
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
    # A later stage cannot start from adapters alone: a one-line error says how to export them merged.
    later = _config(tmp_path / "c", small_world, 1)
    later = dataclasses.replace(
        later, model=dataclasses.replace(MODEL, init_from=f"ckpt:{tmp_path / 'b' / 'checkpoints' / 'sft'}")
    )
    with pytest.raises(
        CheckpointError, match=r"is a LoRA run's checkpoint \(lora.rank=4: adapters only.*merge_lora"
    ):
        common.init_params(later, rules_for(devices=1))


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
