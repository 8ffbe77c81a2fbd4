"""The evaluation job (`job="eval"`) and the function the pipeline calls per stage.

    tasks = world_tasks(paths, max_examples=0)          the world's held-out splits, with their ground truth
    metrics = evaluate_policy(policy, tasks, baseline=..., scorer=..., reference=..., judge=...)
    run(config)                                         loads the models of `config.eval`, writes W/eval.json

Metrics (names as in issue 14; each only when its inputs are given):
  qa_exact_match     held-out fact questions (the first question of each sft_eval `fact` conversation, in the
                     phrasings SFT teaches, about people no train split asks about): `metrics.contains_match` of
                     the greedy answer against the value the world's answer states
  arith_accuracy     held-out arithmetic (rl_eval `arithmetic`): `metrics.arith_answer` == the result
  perplexity         held-out pretraining text (pretrain_eval), token-weighted
  mean_length        completion tokens of the answers to the held-out chat prompts (preference_eval prompts)
  win_rate_vs_sft    on those prompts, against the baseline's answers, judged by the world's ground truth;
                     `win_rate_vs_sft_rm` by the reward model, `win_rate_vs_sft_llm` by an LLM judge (swapped)
  mean_rm_score      the reward model's mean score of the answers
  rm_pair_accuracy   the reward model's pairwise accuracy on preference_eval
  kl_to_ref          mean per-sequence KL to the reference on the policy's own samples (`kl_estimator` names it)
  mc_acc, mc_acc_norm  user multiple-choice JSONL (`eval.mc_input`)
  *_clean            with `eval.contamination` (curation's W/contamination.json): qa_exact_match_clean (and
                     qa_count_clean) over the held-out questions its world_qa benchmark does not list, and mc_*_clean
                     over the MC records no other benchmark lists (decontaminated scores, as GPT-3 and Llama 2 report)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxalign import storage
from jaxalign.config import Config
from jaxalign.data import decontam
from jaxalign.errors import ConfigError
from jaxalign.eval import judges, mc, metrics
from jaxalign.eval import policy as policy_lib
from jaxalign.eval.policy import Messages, Policy

# The order of the printed table (metrics not listed come after, sorted).
ORDER = (
    "qa_exact_match",
    "arith_accuracy",
    "win_rate_vs_sft",
    "win_rate_vs_sft_rm",
    "win_rate_vs_sft_llm",
    "mean_rm_score",
    "rm_pair_accuracy",
    "kl_to_ref",
    "kl_estimator",
    "mean_length",
    "perplexity",
    "mc_acc",
    "mc_acc_norm",
)


@dataclasses.dataclass
class WorldTasks:
    """The world's held-out evaluation items."""

    qa: list[tuple[Messages, str]]  # (prompt, gold value)
    arith: list[tuple[Messages, str]]  # (prompt, integer result as text)
    chat: list[tuple[Messages, str]]  # (prompt, gold value of its correct answer): win rate, RM score, length
    texts: list[str]  # held-out pretraining documents (perplexity)
    preference: list[dict[str, Any]]  # held-out preference pairs (RM pairwise accuracy)
    qa_ids: list[str] = dataclasses.field(default_factory=list)  # sft_eval record id of each qa item


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    lines = storage.path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def gold_value(answer: str) -> str:
    """The value a world's correct answer states: its last word without the final period ("Ada Abbott was born in
    Lisbon." -> "Lisbon", "12 + 5 = 17." -> "17"); every correct answer the world writes ends with it."""
    return answer.strip().rstrip(".").split()[-1]


def _first_question(messages: Messages) -> tuple[Messages, str]:
    """The conversation up to its first assistant turn, and the value that answer states."""
    first = [m["role"] for m in messages].index("assistant")
    return messages[:first], gold_value(messages[first]["content"])


def world_tasks(paths: Mapping[str, str], max_examples: int = 0) -> WorldTasks:
    """The evaluation items of a world written by `data.synthetic.write_world` (`paths` is its return value);
    `max_examples` > 0 keeps the first that many of each task."""
    cap = (lambda xs: xs[:max_examples]) if max_examples else (lambda xs: xs)
    rl = _read_jsonl(paths["rl_eval"])
    pref = _read_jsonl(paths["preference_eval"])
    facts = [r for r in _read_jsonl(paths["sft_eval"]) if r["task"] == "fact"]
    return WorldTasks(
        qa=cap([_first_question(r["messages"]) for r in facts]),
        qa_ids=cap([r["id"] for r in facts]),
        arith=cap([(r["prompt"], r["answer"]) for r in rl if r["task"] == "arithmetic"]),
        chat=cap([(r["prompt"], gold_value(r["chosen"][-1]["content"])) for r in pref]),
        texts=cap([r["text"] for r in _read_jsonl(paths["pretrain_eval"])]),
        preference=cap(pref),
    )


def _user_text(messages: Messages) -> str:
    return [m["content"] for m in messages if m["role"] == "user"][-1]


def evaluate_policy(
    policy: Policy,
    tasks: WorldTasks,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    baseline: Policy | None = None,
    baseline_answers: list[str] | None = None,
    scorer: Any = None,
    reference: nnx.Module | None = None,
    judge_policy: Policy | None = None,
    kl_estimator: str = "k3",
    seed: int = 0,
    contaminated: set[str] | None = None,
) -> dict[str, Any]:
    """Every metric of the module doc that its inputs allow, as {name: float} (and `kl_estimator`: str).
    `baseline_answers` (the baseline's answers to `tasks.chat`, e.g. cached by the pipeline) replaces `baseline`.
    `contaminated` (qa item ids, `tasks.qa_ids`) adds qa_exact_match_clean and qa_count_clean."""
    out: dict[str, Any] = {}
    gen = lambda prompts: policy_lib.generate(
        policy, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    if tasks.qa:
        answers = gen([p for p, _ in tasks.qa]).texts
        out["qa_exact_match"] = metrics.qa_exact_match(answers, [g for _, g in tasks.qa])
        if contaminated is not None:
            out.update(clean_qa(answers, [g for _, g in tasks.qa], tasks.qa_ids, contaminated))
    if tasks.arith:
        answers = gen([p for p, _ in tasks.arith]).texts
        out["arith_accuracy"] = metrics.arith_accuracy(answers, [a for _, a in tasks.arith])
    if tasks.texts:
        out["perplexity"] = policy_lib.perplexity(
            policy.model, policy.tokenizer, tasks.texts, policy.batch_size
        )["perplexity"]
    if tasks.chat:
        prompts = [p for p, _ in tasks.chat]
        texts = [_user_text(p) for p in prompts]
        gens = gen(prompts)
        out["mean_length"] = metrics.mean_length(gens.mask_NxC)
        if baseline is not None and baseline_answers is None:
            baseline_answers = policy_lib.generate(
                baseline, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
            ).texts
        rm_judge = (
            None if scorer is None else judges.RewardModelJudge(scorer, policy.tokenizer, policy.template)
        )
        if baseline_answers is not None:
            truth = judges.GroundTruthJudge({t: g for t, (_, g) in zip(texts, tasks.chat, strict=True)})
            out["win_rate_vs_sft"] = judges.win_rate(texts, gens.texts, baseline_answers, truth)
            if rm_judge is not None:
                out["win_rate_vs_sft_rm"] = judges.win_rate(texts, gens.texts, baseline_answers, rm_judge)
            if judge_policy is not None:
                llm = judges.LLMJudge(judge_policy)
                out["win_rate_vs_sft_llm"] = judges.win_rate(texts, gens.texts, baseline_answers, llm)
        if rm_judge is not None:
            out["mean_rm_score"] = float(np.mean(rm_judge.scores(texts, gens.texts)))
    if scorer is not None and tasks.preference:
        out["rm_pair_accuracy"] = judges.reward_pair_accuracy(
            scorer, tasks.preference, policy.tokenizer, policy.template
        )
    if reference is not None:
        prompts = [p for p, _ in tasks.chat] or [p for p, _ in tasks.qa + tasks.arith]
        out.update(
            policy_lib.kl_to_ref(
                policy, reference, prompts, estimator=kl_estimator, max_new_tokens=max_new_tokens, seed=seed
            )
        )
    return out


def clean_qa(
    answers: list[str], golds: list[str], ids: list[str], contaminated: set[str]
) -> dict[str, float]:
    """qa_exact_match over the items whose id is not `contaminated` (NaN if none is left) and their count."""
    if len(ids) != len(answers):
        raise ValueError(f"{len(ids)} qa ids for {len(answers)} answers")
    clean = [k for k, i in enumerate(ids) if i not in contaminated]
    score = (
        metrics.qa_exact_match([answers[k] for k in clean], [golds[k] for k in clean])
        if clean
        else float("nan")
    )
    return {"qa_exact_match_clean": score, "qa_count_clean": float(len(clean))}


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per metric, one column per evaluated policy (blank where it does not apply)."""
    names = [n for n in ORDER if any(n in r for r in results.values())]
    names += sorted({n for r in results.values() for n in r} - set(names))
    cols = list(results)
    cell = lambda v: "" if v is None else v if isinstance(v, str) else f"{v:.4g}"
    rows = [["metric", *cols]] + [[n, *(cell(results[c].get(n)) for c in cols)] for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def write_results(workdir: str, name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """Sets `name` in workdir/eval.json (keeping the other keys), atomically; returns the whole file's content."""
    path = storage.path(workdir) / "eval.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = dict(result)
    if jax.process_index() == 0:
        storage.write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


# --- the job -------------------------------------------------------------------------------------------------------


def _load_policy(config: Config, rules: Any, tokenizer: Any, init_from: str) -> Policy:
    from jaxalign.stages import model_init

    cfg = dataclasses.replace(config.model, init_from=init_from)
    model = nnx.merge(*model_init.init_params(config, rules, model_cfg=cfg, adapters=False))
    return Policy(model, tokenizer, config.data.chat_template, config.eval.batch_size)


def run(config: Config) -> dict[str, Any]:
    """Evaluates `model.init_from` (random weights when empty) as `eval` configures; writes and prints eval.json."""
    # The job is a leaf like a training stage: it reuses the stages' model and tokenizer loading.
    from jaxalign.parallel.mesh import Rules
    from jaxalign.stages import common, reward

    ecfg = config.eval
    rules = Rules.from_config(config)
    if ecfg.batch_size % rules.data_parallel_size:
        raise ConfigError(
            f"eval.batch_size={ecfg.batch_size} is not divisible by the data-parallel size "
            f"{rules.data_parallel_size} (mesh {dict(rules.mesh.shape)})"
        )
    if not ecfg.world and not ecfg.mc_input:
        raise ConfigError("eval.world=False and eval.mc_input is empty: nothing to evaluate")
    tokenizer = common.tokenizer(config)
    policy = _load_policy(config, rules, tokenizer, config.model.init_from)
    contamination = decontam.contaminated_ids(ecfg.contamination) if ecfg.contamination else None
    others = None  # the MC benchmarks' contaminated ids: every benchmark but the world's
    if contamination is not None:
        others = set().union(*(v for k, v in contamination.items() if k != decontam.WORLD_QA))
    other = lambda path: _load_policy(config, rules, tokenizer, path) if path else None
    result: dict[str, Any] = {}
    if ecfg.world:
        tasks = world_tasks(common.world(config), ecfg.max_examples)
        reference = other(ecfg.reference)
        scorer = (
            reward.load_scorer(ecfg.reward_model, tokenizer, rules, ecfg.batch_size)
            if ecfg.reward_model
            else None
        )
        result.update(
            evaluate_policy(
                policy,
                tasks,
                max_new_tokens=ecfg.max_new_tokens,
                temperature=ecfg.temperature,
                baseline=other(ecfg.baseline),
                scorer=scorer,
                reference=None if reference is None else reference.model,
                judge_policy=other(ecfg.judge_model),
                kl_estimator=ecfg.kl_estimator,
                seed=config.seed,
                contaminated=None if contamination is None else contamination.get(decontam.WORLD_QA, set()),
            )
        )
    if ecfg.mc_input:
        records = mc.read_records(ecfg.mc_input)
        if ecfg.max_examples:
            records = records[: ecfg.max_examples]
        result.update(mc.evaluate(policy.model, tokenizer, records, ecfg.batch_size, others))
    data = write_results(config.workdir, ecfg.name, result)
    print(format_table({ecfg.name: data[ecfg.name]}), flush=True)
    return result
