"""Pipeline parallelism (`mesh.stage` > 1) == the unpipelined model: loss and every gradient of one step on pipelined
meshes (GPipe, circular and 1F1B, alone and with data/fsdp/tensor, 1 to 8 microbatches) equal the single-device values at
fp32 rtol 1e-5; the block parameters really live per stage; checkpoints move between stage=2, stage=1 and fsdp=8; a
DPO train step (with gradient accumulation and a live reference) matches under GPipe and 1F1B; the stage == 1 trace is unchanged.
The SIGKILL resume of a pipelined run is in tests/train/test_resume.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import config as config_lib
from jaxalign.config import DpoConfig, MeshConfig, OptimConfig
from jaxalign.data import pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.errors import ConfigError
from jaxalign.models.transformer import Transformer, init_model
from jaxalign.parallel import pipeline
from jaxalign.parallel.mesh import PipelineSchedule, Rules, make_mesh
from jaxalign.stages import dpo, pretrain
from jaxalign.train import state as state_lib
from jaxalign.train.checkpoint import Checkpointer
from tests.helpers import lm_batch, tiny

MODEL = tiny(n_layers=4, scan_layers=True)


def rules_for(devices=None, schedule="gpipe", microbatches=0, repeats=1, **mesh) -> Rules:
    cfg = MeshConfig(**{"fsdp": 1, **mesh})
    devs = jax.devices()[: devices or jax.device_count()]
    return Rules(make_mesh(cfg, devs), cfg.rules, PipelineSchedule(schedule, microbatches, repeats))


def loss_and_grads(cfg, rules, batch):
    graphdef, params = init_model(cfg, rules, seed=0)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    loss = functools.partial(pretrain.loss_fn, graphdef=graphdef, z_loss=1e-4)

    @functools.partial(
        jax.jit,
        in_shardings=(shardings, rules.sharding(("batch", "length"))),
        out_shardings=(None, shardings),
    )
    def step(params, batch):
        # jax.value_and_grad, or the 1F1B schedule's hand-scheduled equivalent.
        (loss_sum, (weight, _)), grads = pipeline.value_and_grad(loss)(params, batch)
        return loss_sum / weight, jax.tree.map(lambda g: g / weight, grads)

    return params, *step(params, batch)


@pytest.fixture(scope="module")
def reference():
    batch = lm_batch(np.random.default_rng(0), batch=8, length=16, vocab=MODEL.vocab_size)
    _, loss, grads = loss_and_grads(MODEL, rules_for(devices=1), batch)
    return batch, loss, grads


# (mesh, schedule, microbatches (0: mesh.stage), repeats[, model.remat]). 8 rows: with data x fsdp = 4, 2
# microbatches of 4 rows.
CASES = {
    "stage2-gpipe-m2": (dict(stage=2, devices=2), "gpipe", 0, 1),
    "stage2xdata2-gpipe-m2-remat-full": (dict(stage=2, data=2, devices=4), "gpipe", 2, 1, "full"),
    "stage4-gpipe-m8": (dict(stage=4, devices=4), "gpipe", 8, 1),
    "stage2xfsdp2xtensor2-gpipe-m1": (dict(stage=2, fsdp=2, tensor=2), "gpipe", 1, 1),
    "stage2xdata2xfsdp2-circular-r2-m2": (dict(stage=2, data=2, fsdp=2), "circular", 2, 2),
    "stage2xfsdp2xtensor2-circular-r2-m8": (dict(stage=2, fsdp=2, tensor=2), "circular", 8, 2),
    "stage2-1f1b-m2": (dict(stage=2, devices=2), "1f1b", 2, 1),
    "stage2xdata2-1f1b-m2-remat-full": (dict(stage=2, data=2, devices=4), "1f1b", 2, 1, "full"),
    "stage4-1f1b-m8": (dict(stage=4, devices=4), "1f1b", 8, 1),
    "stage2xfsdp2xtensor2-1f1b-m8": (dict(stage=2, fsdp=2, tensor=2), "1f1b", 8, 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pipelined_step_equals_single_device(reference, case):
    batch, ref_loss, ref_grads = reference
    mesh, schedule, microbatches, repeats, *remat = CASES[case]
    rules = rules_for(schedule=schedule, microbatches=microbatches, repeats=repeats, **mesh)
    assert pipeline.active(rules)
    params, loss, grads = loss_and_grads(
        dataclasses.replace(MODEL, remat=(remat or ["none"])[0]), rules, batch
    )

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    for (path, g_ref), g in zip(flat_ref, jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))

    # The stacked blocks are split over `stage` (and the other axes as before); each device holds L / S layers.
    S = rules.mesh.shape["stage"]
    fsdp = "fsdp" if rules.mesh.shape["fsdp"] > 1 else None
    tensor = "tensor" if rules.mesh.shape["tensor"] > 1 else None
    w = params["blocks"]["mlp"]["w_gate"][...]
    assert w.sharding.spec == P("stage", fsdp, tensor)
    assert {s.data.shape[0] for s in w.addressable_shards} == {MODEL.n_layers // S}
    # Device s of the stage axis holds layers [s L / S, (s + 1) L / S).
    stage_of = {d: index[3] for index, d in np.ndenumerate(rules.mesh.devices)}
    per_stage = MODEL.n_layers // S
    for shard in w.addressable_shards:
        s = stage_of[shard.device]
        assert shard.index[0] == slice(s * per_stage, (s + 1) * per_stage)
    # The embedding and head are not split over `stage` (module docstring of parallel/pipeline.py).
    assert "stage" not in str(params["embed"][...].sharding.spec)


def test_stage_one_traces_the_unpipelined_program():
    """mesh.stage == 1: the `layers` -> `stage` rule is dropped and `hidden` is the plain scan, the same jaxpr as
    with the rules table before pipelining existed."""
    batch = lm_batch(np.random.default_rng(0), batch=8, length=16, vocab=MODEL.vocab_size)
    cfg = MeshConfig(fsdp=8)
    mesh = make_mesh(cfg)
    old_table = tuple((k, () if k == "layers" else v) for k, v in cfg.rules)
    assert old_table != cfg.rules

    def jaxpr(table):
        rules = Rules(mesh, table)
        graphdef, params = jax.eval_shape(lambda: nnx.split(Transformer(MODEL, nnx.Rngs(0), rules)))
        loss = functools.partial(pretrain.loss_fn, graphdef=graphdef, z_loss=0.0)
        return str(jax.make_jaxpr(jax.grad(lambda p, b: loss(p, b)[0]))(params, batch))

    assert jaxpr(cfg.rules) == jaxpr(old_table)


def test_checkpoint_saved_with_stage2_restores_on_stage1_and_fsdp8(tmp_path, small_world):
    optim = OptimConfig()
    source = rules_for(stage=2, fsdp=4)
    graphdef, params = init_model(MODEL, source, seed=3)
    state, _ = state_lib.create_sharded(graphdef, params, optim, 10, 3, source)
    assert state.params["blocks"]["attn"]["wq"][...].sharding.spec == P("stage", "fsdp", None)
    loader = pipelines.lm_loader(
        small_world["pretrain_train"],
        SentencePieceTokenizer(small_world["tokenizer"]),
        seq_len=16,
        global_batch_size=8,
        seed=0,
    )
    raw = config_lib.defaults()
    raw.update(workdir=str(tmp_path))
    raw.checkpoint.update(async_save=False)
    run_config = config_lib.from_config_dict(raw)
    with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
        ckpt.save(5, state, loader)

    for target in (rules_for(devices=1), rules_for(fsdp=8)):
        _, other = init_model(MODEL, target, seed=99)
        fresh, shardings = state_lib.create_sharded(graphdef, other, optim, 10, 99, target)
        with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
            restored = ckpt.restore(5, shardings, fresh, loader)
        w = restored.params["blocks"]["attn"]["wq"][...]
        assert w.sharding.mesh.shape == target.mesh.shape and "stage" not in str(w.sharding.spec)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    loader.close()


def _preference_batch(rows: int, length: int) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for side in ("chosen", "rejected"):
        b = lm_batch(rng, batch=rows, length=length, vocab=MODEL.vocab_size, packed=False)
        b["weights"][:, : length // 2] = 0  # the prompt half carries no loss
        out.update({f"{side}_{k}": v for k, v in b.items()})
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dpo_train_step_pipelined_equals_unpipelined(schedule):
    """DPO (the 2B chosen + rejected rows through the trunk, a live reference model, 2 accumulation steps) on
    stage2 x fsdp2 x tensor2 gives the single-device update, loss and metrics."""
    optim = OptimConfig(lr=1.0, eps=1.0, warmup_steps=0, weight_decay=0.0, clip_norm=0.0)
    cfg = DpoConfig(objective="dpo", loss_type="sigmoid")
    batch = jax.tree.map(jnp.asarray, _preference_batch(rows=8, length=16))
    step = functools.partial(dpo.train_step, cfg=cfg, optim=optim, microbatches=2)

    def run(rules):
        graphdef, params = init_model(MODEL, rules, seed=0)
        _, ref = init_model(MODEL, rules, seed=1)
        state, _ = state_lib.create_sharded(graphdef, params, optim, 10, 0, rules)
        return jax.jit(step)(state, batch, ref)

    (s1, m1), (sp, mp) = (
        run(rules_for(devices=1)),
        run(rules_for(schedule=schedule, stage=2, fsdp=2, tensor=2)),
    )
    assert abs(float(m1["rewards/margins"])) > 1e-4 and float(m1["grad_norm"]) > 0
    assert set(mp) == set(m1)
    for k in m1:
        np.testing.assert_allclose(float(mp[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(sp.params), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_1f1b_refuses_an_objective_that_runs_the_layers_twice():
    rules = rules_for(schedule="1f1b", stage=2, devices=2)
    graphdef, params = init_model(MODEL, rules, seed=0)
    batch = lm_batch(np.random.default_rng(0), batch=4, length=8, vocab=MODEL.vocab_size)

    def twice(params, batch):
        model = nnx.merge(graphdef, params)
        h = model.hidden(batch["inputs"]) + model.hidden(batch["targets"])
        return jnp.sum(h), (jnp.float32(1), {})

    with pytest.raises(ConfigError, match="runs them 2 times"):
        pipeline.value_and_grad(twice)(params, batch)


def _config(**sections) -> config_lib.Config:
    raw = config_lib.defaults()
    raw.workdir = "/tmp/unused"
    for name, values in sections.items():
        raw[name].update(values)
    return config_lib.from_config_dict(raw)


@pytest.mark.parametrize(
    "sections,message",
    [
        (
            dict(mesh=dict(stage=2, fsdp=-1), model=dict(n_layers=3)),
            "model.n_layers=3 is not divisible by mesh.stage=2 x pipeline.repeats=1",
        ),
        (
            dict(mesh=dict(stage=2, fsdp=-1), pipeline=dict(schedule="circular", repeats=4)),
            "model.n_layers=4 is not divisible by mesh.stage=2 x pipeline.repeats=4",
        ),
        (
            dict(pipeline=dict(repeats=2)),
            "pipeline.repeats=2 needs pipeline.schedule='circular', got 'gpipe'",
        ),
        (
            dict(mesh=dict(stage=4, fsdp=-1), pipeline=dict(schedule="circular", microbatches=2)),
            "pipeline.microbatches=2 must be >= mesh.stage=4 for schedule='circular'",
        ),
        (
            dict(mesh=dict(stage=2, fsdp=-1), pipeline=dict(microbatches=3)),
            "train.batch_size=8 / train.grad_accum=1 = 8 rows per step are not divisible by "
            "pipeline.microbatches=3",
        ),
        (
            dict(mesh=dict(stage=4, fsdp=-1), pipeline=dict(schedule="1f1b", microbatches=2)),
            "pipeline.microbatches=2 must be >= mesh.stage=4 for schedule='1f1b'",
        ),
        (
            dict(mesh=dict(stage=2, fsdp=-1), pipeline=dict(schedule="1f1b"), lora=dict(rank=8)),
            "pipeline.schedule='1f1b' with lora.rank=8",
        ),
        (dict(pipeline=dict(microbatches=-1)), "pipeline.microbatches=-1 must be >= 0"),
    ],
)
def test_bad_pipeline_configs_are_one_line_errors(sections, message):
    with pytest.raises(ConfigError) as e:
        _config(**sections)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_stage_flag_stacks_the_layers_of_any_config():
    config = _config(mesh=dict(stage=2, fsdp=-1), model=dict(scan_layers=False))
    assert config.model.scan_layers
    assert not _config(model=dict(scan_layers=False)).model.scan_layers
    # A model built directly with pipelined rules stacks its layers too.
    cfg, rules = dataclasses.replace(MODEL, scan_layers=False), rules_for(stage=2, devices=2)
    _, abstract = jax.eval_shape(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0), rules)))
    assert abstract["blocks"]["mlp"]["w_up"].shape == (MODEL.n_layers, MODEL.d_model, MODEL.d_ff)
