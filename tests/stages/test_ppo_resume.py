"""PPO through the real command line, on `configs/ppo.py:smoke` as it is (20 steps; checkpoints and held-out
evaluations at steps 10 and 20): a run that trains its own tiny SFT policy and RM first (ppo.bootstrap_steps=40)
raises the RM's mean score of greedy held-out completions; a run SIGKILLed right after a checkpoint resumes bitwise
(sampler key, minibatch permutations and prompt position restored); a later stage starts from the PPO checkpoint's
policy."""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

# One xdist worker runs this module (pyproject.toml's --dist loadgroup): the uninterrupted PPO run is made once.
pytestmark = pytest.mark.xdist_group("test_ppo_resume")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(workdir, *overrides):
    return [
        sys.executable,
        "-m",
        "jaxalign.main",
        "--config=configs/ppo.py:smoke",
        f"--config.workdir={workdir}",
        "--config.train.progress=False",
        "--config.train.peak_flops=1e9",  # skips measuring the matmul peak (MFU is not compared)
        *overrides,
    ]


def run(workdir, *overrides, expect=0, **extra_env):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", **extra_env
    )
    proc = subprocess.run(
        command(workdir, *overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def records(workdir, key="loss"):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["stage"] == "ppo" and key in r}


def state_bytes(workdir, step):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "ppo" / str(step) / "state")
    leaves = jax.tree_util.tree_leaves_with_path({"params": restored["params"], "opt": restored["opt_state"]})
    return [(jax.tree_util.keystr(path), np.asarray(x).tobytes()) for path, x in leaves]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Bootstraps a tiny SFT policy and RM (40 steps each), then 20 PPO steps."""
    workdir = tmp_path_factory.mktemp("straight")
    run(workdir)
    return workdir


def test_ppo_raises_the_held_out_rm_score_with_the_kl_reported(straight):
    evals = records(straight, "eval/score")
    before, after = evals[0]["eval/score"], evals[20]["eval/score"]
    print(f"held-out RM score {before:.3f} -> {after:.3f}")
    assert after > before
    steps = records(straight)
    assert sorted(steps) == list(range(1, 21))
    kls = [steps[s]["objective/kl"] for s in steps]
    print("objective/kl per step:", [round(k, 3) for k in kls])
    assert (
        all(math.isfinite(k) for k in kls) and steps[1]["objective/kl"] == 0.0
    )  # step 1: policy == reference
    for key in (
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "policy/entropy_avg",
        "objective/rlhf_reward",
        "objective/scores",
        "completions/mean_length",
        "time/generation_s",
        "time/scoring_s",
    ):
        assert all(math.isfinite(steps[s][key]) for s in steps), key


def test_ppo_resume_after_sigkill_is_bitwise_identical(straight, tmp_path):
    shared = (
        f"--config.data.input={straight / 'data' / 'rl_train.jsonl'}",
        f"--config.data.eval_input={straight / 'data' / 'rl_eval.jsonl'}",
        f"--config.model.init_from=ckpt:{straight / 'checkpoints' / 'sft'}",
        f"--config.ppo.reward_model={straight / 'checkpoints' / 'reward'}",
        "--config.ppo.bootstrap_steps=0",
    )
    run(tmp_path, *shared, expect=-signal.SIGKILL, JAXALIGN_FAULT_KILL_AFTER_SAVE="10")
    proc = run(tmp_path, *shared)
    assert "resumed from step 10" in proc.stdout
    assert state_bytes(tmp_path, 20) == state_bytes(straight, 20)
    resumed, reference = records(tmp_path), records(straight)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):  # the same completions, scores and updates after the resume
        for key in (
            "loss",
            "objective/scores",
            "objective/kl",
            "completions/mean_length",
            "policy/clipfrac_avg",
        ):
            assert resumed[step][key] == reference[step][key], (step, key)


def test_a_later_stage_starts_from_the_ppo_policy(straight):
    from jaxalign.config import from_config_dict
    from jaxalign.stages import model_init
    from tests.helpers import rules_for

    saved = json.loads((straight / "config.json").read_text())
    model = {**saved["model"], "init_from": f"ckpt:{straight / 'checkpoints' / 'ppo'}"}
    config = from_config_dict({"workdir": str(straight / "later"), "model": model})
    _, params = model_init.init_params(config, rules_for(1))
    policy = ocp.StandardCheckpointer().restore(straight / "checkpoints" / "ppo" / "20" / "state")["params"][
        "policy"
    ]
    flat = list(nnx.to_flat_state(params))
    assert flat
    for path, var in flat:
        node = policy
        for k in (*map(str, path), "value"):
            node = node[k]
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(node))
