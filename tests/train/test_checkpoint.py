"""Checkpoint resharding and NaN handling, in process (the `corpus` fixture is in conftest.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign import config as config_lib
from jaxalign.config import OptimConfig
from jaxalign.data import pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.errors import TrainingError
from jaxalign.models.transformer import flops_per_token, init_model
from jaxalign.stages import pretrain
from jaxalign.train import state as state_lib
from jaxalign.train.checkpoint import Checkpointer, config_differences
from tests.helpers import rules_for, tiny


def smoke_config(workdir, corpus, **train):
    base = config_lib.defaults()
    base.update(workdir=str(workdir))
    base.model.update(vocab_size=512, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    base.train.update(steps=6, batch_size=8, seq_len=32, log_every=1, progress=False, **train)
    base.optim.update(warmup_steps=1)
    base.data.update(input=corpus["input"], tokenizer=corpus["tokenizer"])
    base.checkpoint.update(every_steps=2, async_save=False)
    return config_lib.from_config_dict(base)


def test_checkpoint_saved_on_fsdp8_restores_onto_data2_tensor4(tmp_path, corpus):
    cfg = tiny()
    optim = OptimConfig()
    source, target = rules_for(fsdp=8), rules_for(data=2, fsdp=1, tensor=4)
    graphdef, params = init_model(cfg, source, seed=3)
    state, _ = state_lib.create_sharded(graphdef, params, optim, 10, 3, source)
    loader = pipelines.lm_loader(
        corpus["input"], SentencePieceTokenizer(corpus["tokenizer"]), seq_len=32, global_batch_size=8, seed=0
    )
    run_config = smoke_config(tmp_path, corpus)
    with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
        ckpt.save(5, state, loader)

    _, params_b = init_model(cfg, target, seed=99)
    fresh, shardings = state_lib.create_sharded(graphdef, params_b, optim, 10, 99, target)
    with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
        restored = ckpt.restore(5, shardings, fresh, loader)

    w = restored.params["blocks"][0]["mlp"]["w_gate"][...]
    assert w.sharding.spec == P(None, "tensor") and w.sharding.mesh.shape["data"] == 2
    assert restored.opt_state[1][0].mu["embed"][...].sharding.spec == P("tensor", None)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def poison(loader, bad_step):
    """Wraps a loader so that batch number `bad_step` (1-based) has NaN loss weights."""

    class Poisoned:
        def __init__(self):
            self.count = 0

        def __next__(self):
            batch = next(loader)
            self.count += 1
            if self.count == bad_step:
                batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
            return batch

        def get_state(self):
            return loader.get_state()

        def set_state(self, state):
            loader.set_state(state)

    return Poisoned()


def test_nan_aborts_naming_the_step_by_default(tmp_path, corpus, monkeypatch):
    original = pipelines.lm_loader
    monkeypatch.setattr(pipelines, "lm_loader", lambda *a, **k: poison(original(*a, **k), 5))
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 5 .* last good checkpoint: step 4"):
        pretrain.run(smoke_config(tmp_path, corpus))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]


def test_nan_skip_policy_continues_and_counts(tmp_path, corpus, monkeypatch):
    original = pipelines.lm_loader
    monkeypatch.setattr(pipelines, "lm_loader", lambda *a, **k: poison(original(*a, **k), 3))
    result = pretrain.run(smoke_config(tmp_path, corpus, nan_policy="skip"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [0, 0, 1, 0, 0, 0]
    assert lines[-1]["skipped_total"] == 1 and np.isnan(lines[2]["loss"])
    assert int(result.state.step) == 6 and np.isfinite(lines[-1]["loss"])


def test_resume_compares_the_synthetic_world_only_when_it_is_the_data():
    def saved(**data):
        raw = config_lib.defaults()
        raw.workdir = "/tmp/unused"
        raw.data.update(data)
        return json.loads(config_lib.from_config_dict(raw).to_json())

    world = saved(synthetic_seed=0)
    assert config_differences(world, saved(synthetic_seed=0)) == []
    assert config_differences(world, saved(synthetic_seed=1)) == ["data.synthetic_seed: checkpoint 0, run 1"]
    assert config_differences(world, saved(synthetic_entities=50)) == [
        "data.synthetic_entities: checkpoint 400, run 50"
    ]
    # A corpus of the user's: the world's keys do not matter (data.input itself must match).
    corpus = saved(input="/c/*.jsonl", synthetic_seed=0)
    assert config_differences(corpus, saved(input="/c/*.jsonl", synthetic_seed=1)) == []
    assert config_differences(corpus, world) == ["data.input: checkpoint '/c/*.jsonl', run ''"]
    # A checkpoint from before a world key existed made the default world.
    older = json.loads(json.dumps(world))
    del older["data"]["synthetic_sft_chatty"]
    assert config_differences(older, world) == []
    assert config_differences(older, saved(synthetic_sft_chatty=True)) == [
        "data.synthetic_sft_chatty: checkpoint False, run True"
    ]


def poison_gradients(monkeypatch, bad_step):
    """Gradients of step `bad_step` (1-based) get a NaN while the loss stays finite (a fault in the backward pass)."""
    original = state_lib.apply_gradients

    def apply(state, grads, loss, cfg):
        bad = state.step + 1 == bad_step
        grads = jax.tree.map(
            lambda g: g.at[(0,) * g.ndim].set(jnp.where(bad, jnp.nan, g[(0,) * g.ndim])), grads
        )
        return original(state, grads, loss, cfg)

    monkeypatch.setattr(state_lib, "apply_gradients", apply)


def test_nonfinite_gradients_follow_nan_policy_and_logged_mfu_is_per_device(tmp_path, corpus, monkeypatch):
    poison_gradients(monkeypatch, 3)
    with pytest.raises(
        TrainingError, match=r"non-finite gradients \(finite loss\) at step 3 .* checkpoint: step 2"
    ):
        pretrain.run(smoke_config(tmp_path / "abort", corpus))
    config = smoke_config(tmp_path / "skip", corpus, nan_policy="skip", peak_flops=1e9)
    result = pretrain.run(config)
    lines = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [r["nonfinite"] for r in lines] == [0, 0, 1, 0, 0, 0]
    assert all(np.isfinite(r["loss"]) for r in lines) and np.isnan(lines[2]["grad_norm"])
    assert int(result.state.step) == 6 and lines[-1]["skipped_total"] == 1

    # The same run checks MFU (one fewer training run): train.peak_flops is one device's peak, so
    # MFU = tokens/s x FLOPs per token / (peak x devices).
    per_token = flops_per_token(config.model, config.train.seq_len)
    assert jax.device_count() == 8
    for r in lines:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / (1e9 * 8), rel=1e-9)
