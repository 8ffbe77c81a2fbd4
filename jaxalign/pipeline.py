"""The end-to-end job: raw text to an aligned model in one workdir (`job="pipeline"`, configs/quickstart.py).

    curate -> pretrain -> sft -> reward -> dpo | kto -> ppo -> grpo -> eval        (`pipeline.stages` selects)

Every stage is the stage's own `run(config)` on a config derived from this one: the shared sections (model shape,
mesh, data, checkpoint, seed) as they are, `pipeline.<stage>` setting that stage's steps, batch, length and learning
rate, and `model.init_from` pointing at the checkpoint of the stage before it in the same workdir:

    pretrain   model.init_from as configured (random by default)
    sft        the pretrained policy            reward     the SFT policy's trunk (+ a fresh head)
    dpo, kto   the SFT policy (also their reference)
    grpo, ppo  the latest preference-tuned policy (dpo or kto if they ran, else sft); PPO scores with the reward
               model of the workdir (`checkpoints/reward`) unless ppo.reward_model names another

Curation runs on the synthetic world's raw web-like corpus (workdir/curate/) and the pretraining data is the world's
pretraining split plus the curated documents; its precision and recall against the world's planted duplicates go to
workdir/eval.json ("curate"). A stage that finished is marked in workdir/pipeline/<stage>.done and skipped when the
command is re-run; an interrupted stage resumes from its latest checkpoint; a stage preempted by SIGTERM stops the
pipeline (the re-run continues it).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any

import jax
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import storage
from jaxalign.config import Config, StageRun
from jaxalign.stages import common, model_init
from jaxalign.train import checkpoint as checkpoint_lib

MODULES = {
    "pretrain": "jaxalign.stages.pretrain",
    "sft": "jaxalign.stages.sft",
    "reward": "jaxalign.stages.reward",
    "dpo": "jaxalign.stages.dpo",
    "kto": "jaxalign.stages.kto",
    "ppo": "jaxalign.stages.ppo",
    "grpo": "jaxalign.stages.grpo",
}
POLICY_ORDER = ("grpo", "ppo", "kto", "dpo", "sft", "pretrain")
DUPLICATE_KINDS = ("exact_duplicate", "variant_duplicate", "near_duplicate")


def _marker(workdir: str, stage: str) -> str:
    return storage.join(workdir, "pipeline", f"{stage}.done")


def _finished(workdir: str, stage: str) -> bool:
    return storage.exists(_marker(workdir, stage))


def _mark(workdir: str, stage: str, info: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    storage.write_atomic(_marker(workdir, stage), json.dumps(info))


def _checkpoint(config: Config, stage: str) -> str:
    return checkpoint_lib.stage_directory(config, stage)


def _init_from(config: Config, stage: str, ran: list[str]) -> str:
    """Where `stage` starts: the checkpoint of the policy stage before it (module doc)."""
    before = ran[: ran.index(stage)] if stage in ran else ran
    if stage == "pretrain":
        return config.model.init_from
    if stage in ("sft",):
        candidates = ("pretrain",)
    elif stage in ("reward", "dpo", "kto"):
        candidates = ("sft", "pretrain")
    else:  # grpo, ppo
        candidates = ("dpo", "kto", "sft", "pretrain")
    for c in candidates:
        if c in before or storage.path(_checkpoint(config, c)).is_dir():
            return f"ckpt:{_checkpoint(config, c)}"
    return config.model.init_from


def stage_config(config: Config, stage: str, ran: list[str]) -> Config:
    """The config `stage` runs with (module doc)."""
    run: StageRun = getattr(config.pipeline, stage)
    train = {
        k: v for k, v in (("steps", run.steps), ("batch_size", run.batch_size), ("seq_len", run.seq_len)) if v
    }
    if run.eval_every >= 0:
        train["eval_every"] = run.eval_every
    optim = {"lr": run.lr} if run.lr else {}
    if run.warmup_steps >= 0:
        optim["warmup_steps"] = run.warmup_steps
    checkpoint = {"every_steps": run.every_steps} if run.every_steps else {}
    model = {"init_from": _init_from(config, stage, ran)}
    data = {}
    if stage == "pretrain" and not config.data.input and not config.data.mixture and "curate" in ran:
        paths = common.world(config)
        curated = storage.join(config.workdir, "curate", "curated", "*.jsonl")
        data = {"input": f"{paths['pretrain_train']},{curated}", "eval_input": paths["pretrain_eval"]}
    sections = {}
    if stage == "ppo" and not config.ppo.reward_model:  # the reward model this workdir trained
        sections["ppo"] = {"reward_model": _checkpoint(config, "reward")}
    return config_lib.replace(
        config, job=stage, train=train, optim=optim, checkpoint=checkpoint, model=model, data=data, **sections
    )


def curate(config: Config) -> dict[str, float]:
    """Curates the world's raw corpus into workdir/curate/; returns duplicate precision and recall against the
    world's planted duplicates."""
    from jaxalign.data import curate as curate_lib

    raw = common.world(config)["raw"]
    sub = config_lib.replace(
        config, job="curate", workdir=storage.join(config.workdir, "curate"), data={"input": raw}
    )
    if jax.process_index() == 0:
        curate_lib.run(sub)
    common.barrier("curate")
    return duplicate_scores(raw, storage.join(sub.workdir, "removed.jsonl"))


def duplicate_scores(raw_path: str, removed_path: str) -> dict[str, float]:
    """Precision and recall of the records removed as duplicates against the planted ones (`kind`)."""
    raw = storage.read_text(raw_path).splitlines()
    planted = {r["id"] for r in map(json.loads, raw) if r["kind"] in DUPLICATE_KINDS}
    lines = storage.read_text(removed_path).splitlines()
    removed = {r["id"] for r in map(json.loads, lines) if r["reason"].split(":")[0].endswith("duplicate")}
    hits = len(planted & removed)
    return {
        "dup_precision": hits / max(len(removed), 1),
        "dup_recall": hits / max(len(planted), 1),
        "planted_duplicates": len(planted),
        "removed_as_duplicates": len(removed),
    }


def _write_eval(workdir: str, key: str, values: dict[str, Any]) -> None:
    if jax.process_index() != 0:
        return
    path = storage.join(workdir, "eval.json")
    data = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    data[key] = values
    storage.write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


EVAL_NAMES = {"pretrain": "base", "sft": "sft", "dpo": "dpo", "kto": "kto", "ppo": "ppo", "grpo": "grpo"}


def evaluate_stages(config: Config) -> dict[str, Any]:
    """Evaluates every policy checkpoint of the workdir on the world's held-out splits (`jaxalign.eval`): the base
    (pretrained) model, SFT, and each preference/RL stage against SFT (win rate by the world's ground truth and by the
    reward model, mean reward-model score, KL to the SFT policy); the reward model's pairwise accuracy. Writes each to
    workdir/eval.json and prints the table."""
    from jaxalign.eval import evaluate, judges
    from jaxalign.eval.policy import Policy
    from jaxalign.parallel.mesh import Rules
    from jaxalign.stages import reward

    ecfg = config.eval
    rules = Rules.from_config(config)
    tokenizer = common.tokenizer(config)
    tasks = evaluate.world_tasks(common.world(config), ecfg.max_examples)
    # With decontamination on in curation, qa_exact_match_clean too (eval.contamination, or this run's curation).
    contamination = ecfg.contamination or storage.join(config.workdir, "curate", "contamination.json")
    contaminated = None
    if storage.exists(contamination):
        from jaxalign.data import decontam

        contaminated = decontam.contaminated_ids(contamination).get(decontam.WORLD_QA, set())

    def policy(stage: str) -> Policy:
        cfg = dataclasses.replace(config.model, init_from=f"ckpt:{_checkpoint(config, stage)}")
        model = nnx.merge(*model_init.init_params(config, rules, model_cfg=cfg, adapters=False))
        return Policy(model, tokenizer, config.data.chat_template, ecfg.batch_size)

    have = lambda stage: storage.path(_checkpoint(config, stage)).is_dir()
    scorer = None
    results: dict[str, Any] = {}
    if have("reward"):
        scorer = reward.load_scorer(_checkpoint(config, "reward"), tokenizer, rules, ecfg.batch_size)
        pairs = evaluate._read_jsonl(common.world(config)["preference_eval"])
        if ecfg.max_examples:
            pairs = pairs[: ecfg.max_examples]
        results["reward"] = {
            "pair_accuracy": judges.reward_pair_accuracy(scorer, pairs, tokenizer, config.data.chat_template)
        }
        evaluate.write_results(config.workdir, "reward", results["reward"])
    sft = policy("sft") if have("sft") else None
    for stage, name in EVAL_NAMES.items():
        if not have(stage):
            continue
        against_sft = stage not in ("pretrain", "sft") and sft is not None
        results[name] = evaluate.evaluate_policy(
            policy(stage) if stage != "sft" else sft,
            tasks,
            max_new_tokens=ecfg.max_new_tokens,
            temperature=ecfg.temperature,
            baseline=sft if against_sft else None,
            scorer=scorer if stage != "pretrain" else None,
            reference=sft.model if against_sft else None,
            kl_estimator=ecfg.kl_estimator,
            seed=config.seed,
            contaminated=contaminated,
        )
        evaluate.write_results(config.workdir, name, results[name])
    print(evaluate.format_table({k: v for k, v in results.items() if k != "reward"}), flush=True)
    if "reward" in results:
        print(f"reward model pairwise accuracy: {results['reward']['pair_accuracy']:.3f}", flush=True)
    return results


def run(config: Config) -> None:
    stages = list(config.pipeline.names)
    for stage in stages:
        if _finished(config.workdir, stage):
            print(f"pipeline: {stage} finished before; skipped", flush=True)
            continue
        print(f"pipeline: {stage}", flush=True)
        if stage == "curate":
            scores = curate(config)
            _write_eval(config.workdir, "curate", scores)
            _mark(config.workdir, stage, scores)
            continue
        if stage == "eval":
            evaluate_stages(config)
            _mark(config.workdir, stage, {})
            continue
        sub = stage_config(config, stage, stages)
        result = importlib.import_module(MODULES[stage]).run(sub)
        if getattr(result, "preempted", False):
            print(f"pipeline: {stage} preempted at step {result.last_step}; re-run the command to continue")
            return
        _mark(config.workdir, stage, {"last_step": result.last_step})
    if jax.process_index() == 0:  # W/report.md and its plots, from eval.json and metrics.jsonl
        from jaxalign.eval import report

        print(report.write_report(config.workdir), flush=True)
    print(f"pipeline: done ({', '.join(stages)}) in {config.workdir}", flush=True)
