"""Each post-training stage does its job on the synthetic world (measured improvements, not "it runs"), on the
smallest model that shows the effect: 2 layers of width 128, 100 people, through the real pipeline command.

One chain per session, the main job's (configs/quickstart.py) without curation and RL: pretrain -> SFT (half of each
batch replayed pretraining text) -> reward model -> DPO (with the RPO term) -> evaluation, and beside it SFT without
replay, LoRA SFT and QLoRA SFT from the same pretrained checkpoint. Each test names the figures measured on this
chain; the runs are deterministic on CPU.
"""

import json
import shutil

import pytest

from tests.test_main import run_main

# The main job's chain (configs/quickstart.py: model, stage lengths and learning rates) without curation and RL, so
# pretraining sees the world's corpus only and 400 steps suffice (the quickstart adds the curated text: 700), on the
# world's default arithmetic (the quickstart's 750 one-digit arithmetic documents need more pretraining steps: with
# them, 400 steps left SFT's held-out fact exact match at 0.05). SFT's fact answers keep the quickstart's chatty
# closer (data.synthetic_sft_chatty), the habit DPO's preferences remove.
CHAIN = (
    "--config=configs/quickstart.py",
    "--config.train.progress=False",
    "--config.pipeline.pretrain.steps=400",
    "--config.data.synthetic_arith_max=100",
    "--config.data.synthetic_arith_docs=0",
    "--config.data.synthetic_rl_arithmetic=0",
    # The default world's RL prompts (the quickstart's show-work prompts change the world's text, hence its tokenizer).
    "--config.data.synthetic_rl_show_work=False",
    # Six preference pairs per person instead of two: 630 train pairs, and 70 held-out pairs (64 scored,
    # eval.max_examples) measure the reward model instead of 30, of which 14 happened to be wrong-fact pairs.
    "--config.data.synthetic_preference_per_person=6",
)
STAGES = "--config.pipeline.stages=pretrain,sft,reward,dpo,eval"


# The tests of the chain (and the variants built from its pretraining) run on one xdist worker: the chain is built
# once (pyproject.toml's --dist loadgroup); GRPO's chain is another, on the other worker meanwhile.
ON_THE_CHAINS_WORKER = pytest.mark.xdist_group("world_chain")


def _records(workdir, stage):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["stage"] == stage]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("world_chain")
    proc = run_main(*CHAIN, STAGES, f"--config.workdir={workdir}", devices=1, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads((workdir / "eval.json").read_text())


def _sft_from_the_chains_pretraining(chain, tmp_path_factory, name, *flags):
    """SFT (then evaluation) of the chain's pretrained checkpoint with the same data, tokenizer and steps, and
    `flags` changed; returns the workdir."""
    source = chain[0]
    workdir = tmp_path_factory.mktemp(name)
    for path in ("data", "checkpoints/pretrain"):
        shutil.copytree(source / path, workdir / path)
    for path in ("tokenizer.model", "tokenizer_record.json", "pipeline/pretrain.done"):
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / path, workdir / path)
    proc = run_main(*CHAIN, f"--config.workdir={workdir}", *flags, devices=1, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def sft_without_replay(chain, tmp_path_factory):
    """SFT of the same pretrained checkpoint (same data, tokenizer, steps and learning rate) without replay."""
    return _sft_from_the_chains_pretraining(
        chain,
        tmp_path_factory,
        "world_no_replay",
        "--config.pipeline.stages=pretrain,sft",
        "--config.sft.replay_fraction=0",
    )


# Rank 32, alpha 64 on every projection of every block, at lr 5e-3 for 300 steps (adapters start at B = 0 and move
# slower than full weights at lr 1e-3 for 150 steps); the rest of the SFT recipe is the chain's. Measured LoRA
# held-out exact match after 150 steps: 0.25 at lr 1e-2, 0.35 at 5e-3, 0.3 at rank 64, 0 at 2e-2 (diverged).
LORA = (
    "--config.lora.rank=32",
    "--config.lora.alpha=64",
    "--config.pipeline.sft.lr=5e-3",
    "--config.pipeline.sft.steps=300",
)


@pytest.fixture(scope="module", params=["lora", "qlora"])
def peft_sft(request, chain, tmp_path_factory):
    """(variant, eval.json) of LoRA or QLoRA (NF4 base) SFT of the chain's pretrained checkpoint, then evaluation."""
    quantize = ("--config.lora.quantize=nf4",) if request.param == "qlora" else ()
    workdir = _sft_from_the_chains_pretraining(
        chain,
        tmp_path_factory,
        f"world_{request.param}",
        "--config.pipeline.stages=pretrain,sft,eval",
        *LORA,
        *quantize,
    )
    return request.param, json.loads((workdir / "eval.json").read_text())


@ON_THE_CHAINS_WORKER
def test_sft_raises_held_out_fact_exact_match_over_the_base(chain):
    # Measured: base 0.0 (it continues the prompt as pretraining text), SFT 0.35 on questions about people that no
    # SFT example asks about: the facts come from pretraining, SFT teaches the question-answer format (and the
    # annotators' chatty closer, data.synthetic_sft_chatty: its answers run to the length limit).
    _, results = chain
    base, sft = results["base"]["qa_exact_match"], results["sft"]["qa_exact_match"]
    assert sft >= base + 0.15, (base, sft)


@ON_THE_CHAINS_WORKER
def test_replay_lowers_the_measured_forgetting(chain, sft_without_replay):
    # Forgetting = the held-out pretraining loss after SFT minus before it. Measured: +1.25 nats without replay,
    # -0.08 with half of each batch replayed (it keeps pretraining).
    def forgetting(workdir):
        evals = [r for r in _records(workdir, "sft") if "eval/pretrain_loss" in r]
        assert evals[0]["step"] == 0 and evals[-1]["step"] == 150
        return evals[-1]["eval/pretrain_loss"] - evals[0]["eval/pretrain_loss"]

    with_replay, without = forgetting(chain[0]), forgetting(sft_without_replay)
    assert without > 0.5, without  # SFT alone does forget
    assert with_replay < without - 0.5, (with_replay, without)


@ON_THE_CHAINS_WORKER
def test_reward_model_held_out_pairwise_accuracy(chain):
    # Measured 0.875 on 64 held-out pairs: every verbose and sycophantic rejection (52) ranks below the correct
    # answer; wrong facts about held-out people are at chance (10 of 18 here; 0.37-0.6 on 300 more held-out pairs
    # in variants of this chain), though the SFT policy's own likelihood prefers the true fact on 0.93 of them: this
    # 2-layer trunk's last-token head does not read that knowledge out. With two pairs per person the 30 held-out
    # pairs held 14 wrong-fact ones and the figure ranged 0.63-0.83 over seeds and reward steps.
    _, results = chain
    assert results["reward"]["pair_accuracy"] >= 0.8, results["reward"]


@ON_THE_CHAINS_WORKER
def test_dpo_raises_reward_accuracy_and_the_ground_truth_win_rate_keeping_the_facts(chain):
    # Measured: held-out rewards/accuracies 0 (policy == reference) -> 0.94; on 64 held-out chat prompts DPO drops
    # SFT's chatty closer (mean length 21.0 -> 9.6 tokens): win rate against SFT 0.84 judged by the world's ground
    # truth, 0.92 by the reward model (mean RM score -3.11 -> 2.94); held-out fact exact match kept (0.35 -> 0.35,
    # the RPO term). Preferences about other people add no knowledge at this scale: without the chatty habit the
    # ground-truth win rate was 0.43 (two pairs per person).
    workdir, results = chain
    evals = [r for r in _records(workdir, "dpo") if "eval/rewards/accuracies" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval/rewards/accuracies"] == 0.0
    assert evals[-1]["eval/rewards/accuracies"] >= 0.6, evals[-1]
    dpo, sft = results["dpo"], results["sft"]
    assert dpo["win_rate_vs_sft"] > 0.5 and dpo["mean_length"] < sft["mean_length"], (dpo, sft)
    assert dpo["win_rate_vs_sft_rm"] > 0.5 and dpo["mean_rm_score"] > sft["mean_rm_score"], dpo
    assert dpo["qa_exact_match"] >= sft["qa_exact_match"] - 0.05, (dpo, sft)


@ON_THE_CHAINS_WORKER
def test_lora_and_qlora_sft_reach_most_of_full_sfts_held_out_fact_gain(chain, peft_sft):
    # The bar: LoRA >= 90% and QLoRA >= 85% of full SFT's held-out exact-match gain over the base. Measured
    # (20 held-out fact questions): base 0.0, full SFT 0.35, LoRA 0.45 (129%), QLoRA 0.35 (100%).
    variant, results = peft_sft
    base, full = chain[1]["base"]["qa_exact_match"], chain[1]["sft"]["qa_exact_match"]
    assert full - base >= 0.15, (base, full)
    share = {"lora": 0.90, "qlora": 0.85}[variant]
    gain = results["sft"]["qa_exact_match"] - results["base"]["qa_exact_match"]
    assert gain >= share * (full - base), (variant, gain, full - base)


# GRPO's chain: the main job (configs/quickstart.py: its one-digit arithmetic world, show-work RL prompts, GRPO with
# the answer, format and restate rewards) without curation, reward model and preference stages, and SFT asking all 270
# train arithmetic problems instead of ~90 (with ~90, SFT had not learned to copy the question's operands and GRPO
# raised held-out arithmetic by 3-7 points). No train split holds a held-out problem; the pretraining text states
# every sum.
RL_CHAIN = (
    "--config=configs/quickstart.py",
    "--config.train.progress=False",
    "--config.data.synthetic_sft_arithmetic=300",
    "--config.data.synthetic_sft_chatty=False",
    "--config.pipeline.stages=pretrain,sft,grpo,eval",
)


@pytest.fixture(scope="module")
def rl_chain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("world_rl_chain")
    proc = run_main(*RL_CHAIN, f"--config.workdir={workdir}", devices=1, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, json.loads((workdir / "eval.json").read_text())


def test_grpo_raises_held_out_arithmetic_over_the_sft_policy(rl_chain):
    # The bar: >= 10 points on the 30 held-out problems (greedy answers). Measured: SFT 0.1 -> GRPO 0.53
    # (fact exact match 0.05 -> 0.05), and 0.067 -> 0.6 with seed=1 (at 10b7a39, whose rollouts trimmed of padding
    # change the float rounding and so the sampled trajectory; before it 0.93 and 0.73). SFT teaches the show-work
    # format but mostly restates another problem ("4 * 8 = 32." for 4 * 4), though it completes every plain-text sum
    # right; GRPO's restate and answer rewards on the 270 train problems teach it to copy the question's operands,
    # and the KL penalty keeps the sums (configs/quickstart.py: without it, 0.1 -> 0.1).
    _, results = rl_chain
    sft, grpo = results["sft"], results["grpo"]
    assert grpo["arith_accuracy"] >= sft["arith_accuracy"] + 0.1, (sft, grpo)
    assert grpo["qa_exact_match"] >= sft["qa_exact_match"] - 0.1, (sft, grpo)
