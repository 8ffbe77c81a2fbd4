"""EMA of the params (`train.ema_decay`) and checkpoint averaging (`jaxalign.tools.average`).

The EMA after k jitted steps equals the recurrence recomputed in numpy from the per-step params (a skipped step
leaves both unchanged); a pretraining run with an EMA resumes bitwise after SIGKILL (params, optimizer state and
EMA) and evaluates the EMA params (`eval/loss_ema`); the average of saved steps is exactly the element-wise mean and
loads through `model.init_from="ckpt:DIR"` into a model giving the logits of the mean params; `ckpt:PATH#ema` and
the HF export of the EMA give the EMA's logits.
"""

import functools
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxalign import config as config_lib
from jaxalign.config import OptimConfig
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models import hf
from jaxalign.parallel.mesh import Rules
from jaxalign.stages import model_init, pretrain
from jaxalign.tools import average
from jaxalign.train import state as state_lib
from tests.helpers import lm_batch, random_model, rules_for
from tests.train.test_resume import committed_steps, run

# One xdist worker runs this module (pyproject.toml's --dist loadgroup): its EMA run is made once.
pytestmark = pytest.mark.xdist_group("test_ema")

DECAY = 0.75


def _numpy(tree):
    return {jax.tree_util.keystr(p): np.array(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_ema_equals_the_reference_recurrence_and_skipped_steps_leave_it(tmp_path):
    rules = rules_for(2)
    graphdef, params = random_model(rules=rules)
    optim = OptimConfig(lr=1e-2, warmup_steps=0)
    state, shardings = state_lib.create_sharded(graphdef, params, optim, 10, 0, rules, ema_decay=DECAY)
    initial, ema0 = _numpy(state.params), _numpy(state.ema)
    assert all(np.array_equal(ema0[n], initial[n]) for n in initial)  # ema_0 = the initial params

    def step(state, batch, poison):
        loss = functools.partial(pretrain.loss_fn, graphdef=state.graphdef, z_loss=0.0)
        grads, mean_loss, _ = state_lib.grad_step(loss, state.params, batch, 1)
        # poison = NaN makes the gradients non-finite: the step is skipped (nan_policy="skip").
        return state_lib.apply_gradients(state, jax.tree.map(lambda g: g * poison, grads), mean_loss, optim)

    step_jit = jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, None))
    rng = np.random.default_rng(0)
    ema = _numpy(state.params)
    previous = ema
    for k, poison in enumerate([1.0, 1.0, np.nan, 1.0, 1.0]):
        batch = jax.tree.map(jnp.asarray, lm_batch(rng, 8, 32, 128))
        state, metrics = step_jit(state, batch, jnp.float32(poison))
        params = _numpy(state.params)
        if np.isnan(poison):
            assert int(metrics["skipped"]) == 1
            assert all(np.array_equal(params[n], previous[n]) for n in params)
        else:
            assert not any(np.array_equal(params[n], previous[n]) for n in ("['lm_head'].value",))
            ema = {n: np.float32(DECAY) * ema[n] + np.float32(1 - DECAY) * params[n] for n in ema}
        previous = params
        got = _numpy(state.ema)
        for name in ema:
            np.testing.assert_allclose(
                got[name], ema[name], rtol=1e-6, atol=1e-7, err_msg=f"step {k + 1} {name}"
            )
    assert int(state.guard["skipped"]) == 1


def test_ema_with_lora_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.ema_decay=0.9 with lora.rank=4"):
        config_lib.replace(
            config_lib.Config(workdir=str(tmp_path)), train={"ema_decay": 0.9}, lora={"rank": 4}
        )


def _ema_flags(corpus):
    eval_input = corpus["input"].replace("pretrain_train", "pretrain_eval")
    return (
        f"--config.train.ema_decay={DECAY}",
        f"--config.data.eval_input={eval_input}",
        "--config.train.eval_every=4",
        "--config.train.eval_batches=1",
    )


def _restored(workdir, step):
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "pretrain" / str(step) / "state")


def _state_bytes(workdir, step):
    restored = _restored(workdir, step)
    tree = {k: restored[k] for k in ("params", "opt_state", "ema")}
    return [
        (jax.tree_util.keystr(p), np.asarray(x).tobytes())
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


def _eval_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["eval/loss"], r["eval/loss_ema"]) for r in rows if "eval/loss" in r}


@pytest.fixture(scope="module")
def ema_run(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ema_straight")
    run(workdir, corpus, *_ema_flags(corpus))
    return workdir


def test_pretrain_with_ema_resumes_bitwise_and_evaluates_the_ema(corpus, ema_run, tmp_path):
    kill = dict(JAXALIGN_FAULT_KILL_AFTER_SAVE="8")
    run(tmp_path, corpus, *_ema_flags(corpus), expect=-signal.SIGKILL, **kill)
    assert committed_steps(tmp_path)[-1] == 8
    run(tmp_path, corpus, *_ema_flags(corpus))
    assert _state_bytes(tmp_path, 12) == _state_bytes(ema_run, 12)
    straight = _eval_losses(ema_run)
    assert sorted(straight) == [4, 8, 12]
    assert _eval_losses(tmp_path)[12] == straight[12]
    # The EMA lags the params: a different model, hence a different held-out loss.
    restored = _restored(ema_run, 12)
    assert not np.array_equal(restored["ema"]["lm_head"]["value"], restored["params"]["lm_head"]["value"])
    assert all(loss != ema_loss for loss, ema_loss in straight.values())


def _load(workdir, init_from):
    """(graphdef, params) of the run's model loaded from `init_from` through the stages' init path."""
    saved = json.loads((workdir / "config.json").read_text())
    config = config_lib.from_config_dict({**saved, "model": {**saved["model"], "init_from": init_from}})
    return model_init.init_params(config, Rules.from_config(config))


def _logits(graphdef, params, tokens):
    return np.asarray(nnx.merge(graphdef, params)(tokens))


def _with(params, values):
    """`params` (an nnx.State) with its leaves replaced by the nested-dict `values` of a checkpoint, placed as the
    leaves they replace (the same shardings, so the same computation: a sharded matmul sums in another order)."""

    def get(path):
        node = values
        for k in path:
            node = node[str(k)]
        return node["value"]

    def put(path, v):
        return v.replace(jax.device_put(get(path), v[...].sharding))

    return nnx.from_flat_state([(p, put(p, v)) for p, v in nnx.to_flat_state(params)])


def test_average_is_the_exact_mean_and_loads_as_a_ckpt_init(ema_run, tmp_path):
    out = tmp_path / "avg"
    record = average.main(["--workdir", str(ema_run), "--steps", "4,8,12", "--out", str(out)])
    assert record["steps"] == [4, 8, 12]
    steps = [_restored(ema_run, s)["params"] for s in (4, 8, 12)]
    expected = jax.tree.map(lambda *xs: (sum(np.float64(x) for x in xs) / 3).astype(np.float32), *steps)
    written = ocp.PyTreeCheckpointer().restore(out / "state")["params"]
    assert jax.tree.structure(written) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(written), jax.tree.leaves(expected), strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, want)
    # ckpt:DIR through the stages' init path gives the model of the mean params, logits and all.
    graphdef, loaded = _load(ema_run, f"ckpt:{out}")
    reference = _with(loaded, expected)
    tokens = jnp.asarray(np.random.default_rng(0).integers(4, 512, size=(2, 16)), jnp.int32)
    np.testing.assert_array_equal(_logits(graphdef, loaded, tokens), _logits(graphdef, reference, tokens))
    assert not np.array_equal(
        _logits(graphdef, loaded, tokens), _logits(*_load(ema_run, "ckpt:" + str(ema_run)), tokens)
    )


def test_ema_loads_with_the_ema_selector_and_exports_to_hf(ema_run, tmp_path):
    ema = _restored(ema_run, 12)["ema"]
    graphdef, loaded = _load(ema_run, f"ckpt:{ema_run}/checkpoints/pretrain#ema")
    for p, v in nnx.to_flat_state(loaded):
        node = ema
        for k in p:
            node = node[str(k)]
        assert np.array_equal(np.asarray(v.get_value()), node["value"]), p
    # Exporting the EMA (a one-step "average" of the item "ema") to Hugging Face safetensors.
    hf_dir = tmp_path / "hf"
    average.main(
        [
            "--workdir",
            str(ema_run),
            "--last",
            "1",
            "--item",
            "ema",
            "--out",
            str(tmp_path / "e"),
            "--hf-out",
            str(hf_dir),
        ]
    )
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, 512, size=(2, 16)), jnp.int32)
    exported = hf.load(str(hf_dir))
    np.testing.assert_allclose(
        np.asarray(exported(tokens)), _logits(graphdef, loaded, tokens), rtol=1e-5, atol=1e-5
    )


def test_average_errors_are_one_line(ema_run, tmp_path):
    with pytest.raises(CheckpointError, match=r"steps \[5\] are not committed .* committed: \[4, 8, 12\]"):
        average.main(["--workdir", str(ema_run), "--steps", "4,5", "--out", str(tmp_path / "a")])
    with pytest.raises(ConfigError, match=r"--last 4: .* holds 3 committed steps"):
        average.main(["--workdir", str(ema_run), "--last", "4", "--out", str(tmp_path / "a")])
    # A step of another model: its tree does not match.
    step4 = str(ema_run / "checkpoints" / "pretrain" / "4")
    other = tmp_path / "other"
    saved = json.loads((ema_run / "config.json").read_text())
    average.write(str(other), {"lm_head": {"value": np.zeros((3, 3), np.float32)}}, saved, {})
    with pytest.raises(CheckpointError, match=r"tree differs"):
        average.average_params([step4, str(other)])
    with pytest.raises(CheckpointError, match=r"holds no 'ema'"):
        average.average_params([str(other)], "ema")


@pytest.mark.parametrize("decay", [0.0, DECAY])
def test_state_tree_on_disk_and_restore_onto_another_mesh(tmp_path, corpus, decay):
    """Without an EMA the saved tree is the one saved before EMA existed (no `ema` key); with one, the EMA is saved
    and restored, resharded, with everything else. Switching it on or off on resume is refused."""
    from jaxalign.data import pipelines
    from jaxalign.data.tokenizer import SentencePieceTokenizer
    from jaxalign.train.checkpoint import Checkpointer, config_differences
    from tests.train.test_checkpoint import smoke_config

    optim = OptimConfig()
    source, target = rules_for(fsdp=8), rules_for(data=2, fsdp=1, tensor=4)
    graphdef, params = random_model(rules=source)
    state, _ = state_lib.create_sharded(graphdef, params, optim, 10, 3, source, ema_decay=decay)
    loader = pipelines.lm_loader(
        corpus["input"], SentencePieceTokenizer(corpus["tokenizer"]), seq_len=32, global_batch_size=8, seed=0
    )
    run_config = smoke_config(tmp_path, corpus, ema_decay=decay)
    with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
        ckpt.save(5, state, loader)
    saved = ocp.StandardCheckpointer().restore(tmp_path / "ckpt" / "5" / "state")
    assert sorted(saved) == sorted(
        ["step", "params", "opt_state", "rng", "guard"] + (["ema"] if decay else [])
    )

    _, params_b = random_model(seed=9, rules=target)
    fresh, shardings = state_lib.create_sharded(graphdef, params_b, optim, 10, 99, target, ema_decay=decay)
    with Checkpointer(str(tmp_path / "ckpt"), run_config.checkpoint, run_config) as ckpt:
        restored = ckpt.restore(5, shardings, fresh, loader)
    assert (restored.ema is None) == (decay == 0)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = json.loads(smoke_config(tmp_path, corpus, ema_decay=0.5 if decay == 0 else 0.0).to_json())
    assert any("train.ema_decay" in d for d in config_differences(json.loads(run_config.to_json()), other))
