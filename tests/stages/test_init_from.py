"""`model.init_from="ckpt:..."` (`stages.model_init.init_params`): weights matched by path across `scan_layers`, a reward
model from a policy (trunk copied, head fresh), a value model from a reward model (trunk and head), one-line errors
for an ambiguous run directory and another architecture, and restores straight into the target mesh's shardings.

Checkpoints are written by the real `train.checkpoint.Checkpointer` from states built by `init_params` itself.
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import CheckpointConfig, Config, OptimConfig, TrainConfig
from jaxalign.data import pipelines
from jaxalign.data.tokenizer import SentencePieceTokenizer
from jaxalign.errors import CheckpointError
from jaxalign.models.heads import ScalarModel
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.stages import model_init
from jaxalign.train import state as state_lib
from jaxalign.train.checkpoint import Checkpointer
from tests.helpers import rules_for, tiny

MODEL = tiny()


def _config(workdir, seed=0, **model):
    return Config(
        workdir=str(workdir),
        seed=seed,
        model=dataclasses.replace(MODEL, **model),
        train=TrainConfig(seq_len=128),
        checkpoint=CheckpointConfig(async_save=False),
    )


def _flat(params):
    """{"a/b/c": numpy array} of a params state."""
    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(params)}


@pytest.fixture(scope="module")
def loader(small_world):
    """A real data iterator for the checkpoints' `data` item."""
    tok = SentencePieceTokenizer(small_world["tokenizer"])
    it = pipelines.sft_loader(small_world["sft_eval"], tok, seq_len=128, global_batch_size=8, seed=0)
    yield it
    it.close()


def save_run(workdir, stage, loader, rules, *, scalar=False, seed=0, edit=None, **model):
    """A run directory with one checkpoint (step 2) of a freshly initialised policy (or scalar model); `edit` may
    change the params first. Returns the saved params, flat."""
    config = _config(workdir, seed=seed, **model)
    graphdef, params = model_init.init_params(config, rules, scalar=scalar)
    if edit is not None:
        params = edit(params)
    state, _ = state_lib.create_sharded(graphdef, params, OptimConfig(), 10, seed, rules)
    with Checkpointer(str(workdir / "checkpoints" / stage), config.checkpoint, config) as ckpt:
        ckpt.save(2, state, loader)
    return _flat(params)


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory, loader):
    """A policy checkpoint saved with scan_layers=False (seed 3): (run directory, its params)."""
    workdir = tmp_path_factory.mktemp("policy")
    return workdir, save_run(workdir, "sft", loader, rules_for(devices=1), seed=3, scan_layers=False)


def _unstack(flat_scanned):
    """Per-layer keys ("blocks/<i>/...") of a scanned model's flat params."""
    out = {}
    for key, value in flat_scanned.items():
        if key.startswith("blocks/"):
            for i in range(value.shape[0]):
                out[f"blocks/{i}/{key[len('blocks/') :]}"] = value[i]
        else:
            out[key] = value
    return out


def test_scan_layers_either_way_loads_the_same_values(tmp_path, policy_run, loader):
    workdir, source = policy_run
    rules = rules_for(devices=1)
    scanned_cfg = _config(tmp_path, scan_layers=True, init_from=f"ckpt:{workdir}")
    _, scanned = model_init.init_params(scanned_cfg, rules)
    flat = _flat(scanned)
    assert flat["blocks/mlp/w_gate"].shape == (MODEL.n_layers, MODEL.d_model, MODEL.d_ff)
    unstacked = _unstack(flat)
    assert sorted(unstacked) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(unstacked[key], value, err_msg=key)

    # And back: a checkpoint saved with scan_layers=True loads into scan_layers=False.
    scanned_run = tmp_path / "scanned_run"
    save_run(scanned_run, "sft", loader, rules, seed=7, scan_layers=True, edit=lambda _: scanned)
    _, back = model_init.init_params(_config(tmp_path, init_from=f"ckpt:{scanned_run}"), rules)
    back = _flat(back)
    assert sorted(back) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_reward_model_from_a_policy_copies_the_trunk_and_starts_a_fresh_head(tmp_path, policy_run):
    workdir, source = policy_run
    rules = rules_for(devices=1)
    _, rm = model_init.init_params(_config(tmp_path, init_from=f"ckpt:{workdir}"), rules, scalar=True)
    rm = _flat(rm)
    trunk = {k[len("trunk/") :]: v for k, v in rm.items() if k.startswith("trunk/")}
    assert sorted(trunk) == sorted(
        k for k in source if k != "lm_head"
    )  # the trunk has no vocabulary projection
    for key, value in trunk.items():
        np.testing.assert_array_equal(value, source[key], err_msg=key)
    # The head is what a random initialisation of this config gives (seed 0), not anything from the checkpoint.
    _, fresh = model_init.init_params(_config(tmp_path), rules, scalar=True)
    fresh = _flat(fresh)
    np.testing.assert_array_equal(rm["head"], fresh["head"])
    assert rm["head_bias"] == 0 and np.std(rm["head"]) > 0.5 * MODEL.init_std
    # ... and the random trunk of that config differs from the loaded one: the copy is not a coincidence.
    assert not np.array_equal(fresh["trunk/embed"], rm["trunk/embed"])


def test_value_model_from_a_reward_model_copies_trunk_and_head(tmp_path, loader):
    rules = rules_for(devices=1)

    def trained_head(params):
        # A head unlike any fresh one: a trained reward model's bias is not zero.
        flat = dict(nnx.to_flat_state(params))
        flat[("head_bias",)] = flat[("head_bias",)].replace(jnp.float32(0.7))
        flat[("head",)] = flat[("head",)].replace(-2 * flat[("head",)].get_value())
        return nnx.from_flat_state(list(flat.items()))

    source = save_run(tmp_path / "rm", "reward", loader, rules, scalar=True, seed=5, edit=trained_head)
    _, value = model_init.init_params(
        _config(tmp_path, init_from=f"ckpt:{tmp_path / 'rm'}/checkpoints/reward"), rules, scalar=True
    )
    value = _flat(value)
    assert sorted(value) == sorted(source)
    for key, v in source.items():
        np.testing.assert_array_equal(value[key], v, err_msg=key)
    assert float(value["head_bias"]) == np.float32(0.7)


def test_a_run_directory_with_two_stages_is_refused_naming_them(tmp_path, policy_run):
    rules = rules_for(devices=1)
    for stage in ("sft", "reward"):  # a pipeline's run directory: one checkpoint directory per stage
        shutil.copytree(policy_run[0] / "checkpoints" / "sft", tmp_path / "checkpoints" / stage)
    with pytest.raises(CheckpointError) as e:
        model_init.init_params(_config(tmp_path / "new", init_from=f"ckpt:{tmp_path}"), rules)
    message = str(e.value)
    assert "has checkpoints of stages ['reward', 'sft']; name one" in message and "\n" not in message
    assert f"'ckpt:{tmp_path}/checkpoints/<stage>'" in message
    # Naming one works, and the step directory itself too.
    _, params = model_init.init_params(
        _config(tmp_path, init_from=f"ckpt:{tmp_path}/checkpoints/sft/2"), rules
    )
    assert "lm_head" in _flat(params)


def test_another_architecture_is_a_checkpoint_error_naming_the_field(tmp_path, policy_run):
    workdir, _ = policy_run
    config = _config(tmp_path, d_ff=2 * MODEL.d_ff, init_from=f"ckpt:{workdir}")
    with pytest.raises(CheckpointError) as e:
        model_init.init_params(config, rules_for(devices=1))
    message = str(e.value)
    assert f"d_ff: checkpoint {MODEL.d_ff}, config {2 * MODEL.d_ff}" in message, message
    assert message.startswith("model.init_from: ") and "\n" not in message
    # How the model runs is not its architecture: scan_layers, remat and attention may differ.
    ok = _config(tmp_path, scan_layers=True, remat="full", init_from=f"ckpt:{workdir}")
    model_init.init_params(ok, rules_for(devices=1))


@pytest.mark.parametrize("scalar, scan_layers", [(False, False), (False, True), (True, False)])
def test_restore_onto_a_sharded_mesh_gives_the_rule_shardings(tmp_path, policy_run, scalar, scan_layers):
    workdir, source = policy_run
    rules = rules_for(fsdp=4, tensor=2)
    config = _config(tmp_path, scan_layers=scan_layers, init_from=f"ckpt:{workdir}")
    _, params = model_init.init_params(config, rules, scalar=scalar)
    cls = ScalarModel if scalar else Transformer
    _, abstract = jax.eval_shape(lambda: nnx.split(cls(config.model, nnx.Rngs(0), rules)))
    expected = dict(nnx.to_flat_state(param_shardings(abstract, rules)))
    split_both = 0
    for path, var in nnx.to_flat_state(params):
        x, want = var.get_value(), expected[path].get_value()
        assert isinstance(x, jax.Array) and x.sharding.is_equivalent_to(want, x.ndim), (
            path,
            x.sharding,
            want,
        )
        assert x.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2, "stage": 1}
        split_both += set(jax.tree.leaves(tuple(x.sharding.spec))) >= {"fsdp", "tensor"}
    assert split_both >= 4  # e.g. the MLP and attention matrices are split over both axes
    flat = _flat(params)
    flat = {k.removeprefix("trunk/"): v for k, v in flat.items() if not k.startswith("head")}
    flat = _unstack(flat) if scan_layers else flat
    for key, value in flat.items():
        np.testing.assert_array_equal(value, source[key], err_msg=key)
