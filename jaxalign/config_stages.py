"""The job-specific sections of the typed, frozen config (`jaxalign.config.Config`): curation, SFT, LoRA, reward
model, DPO/KTO, GRPO, PPO, the end-to-end pipeline and evaluation. Split from jaxalign/config.py to keep modules
short; `jaxalign.config` re-exports every name here, which is where callers import them from. Each section checks
its own keys (ranges in jaxalign/config_ranges.py) and errors name the dotted key and the bad value.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from jaxalign.config_ranges import check_ranges as _check_ranges
from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    """Curation (`job="curate"`): reads `data.input` JSONL records with `id` and `text`."""

    exact_dedup: bool = True
    near_dedup: bool = True
    # MinHash-LSH over word n-grams: num_bands * rows_per_band permutations.
    ngram: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    # LSH candidates are merged only if their signatures agree on >= this fraction of hashes (estimated Jaccard);
    # 0 merges every candidate, as datatrove does.
    near_threshold: float = 0.7
    gopher_quality: bool = True
    gopher_repetition: bool = True
    c4_filters: bool = True
    # C4 also drops the lines its line rules reject from kept documents (as C4 and datatrove do).
    c4_drop_lines: bool = True
    fineweb_filters: bool = True
    pii: bool = True
    # Exact-substring dedup (Lee et al. 2021): cut spans of >= this many tokens (4 bytes each, substring_dedup.py)
    # that occur in an earlier kept record from later ones; 0 = off. Lee et al. use 50. A suffix array in the
    # parent (runner="local") or hashed windows grouped across workers (runner="beam"): the same result.
    substring_dedup_tokens: int = 0
    num_workers: int = 2
    # Where the stages run: "local" (num_workers processes, resumable per shard) or "beam" (an Apache Beam
    # pipeline of every stage, perplexity filter and substring dedup included, with byte-identical outputs,
    # jaxalign/data/curate_beam.py and curate_beam_stages.py; needs the `beam` extra). beam_options: Beam pipeline flags
    # (e.g. "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp"); "" = Beam's local runner.
    runner: Literal["local", "beam"] = "local"
    beam_options: str = ""
    # --- decontamination (jaxalign/data/decontam.py): word n-gram overlap with evaluation sets. "flag" keeps
    # contaminated records and lists them in W/contamination.json, "drop" removes them (reason
    # "decontam:<benchmark>"). The world's held-out questions are checked when the world is the input.
    decontam: Literal["off", "flag", "drop"] = "off"
    # n-gram length in words: 13 as GPT-3, 8 as Llama 2 (shorter items are matched whole).
    decontam_n: int = 13
    # User benchmarks: comma-separated name=glob of JSONL records (question/choices/answer, prompt or text).
    decontam_benchmarks: str = ""
    # --- perplexity filter (jaxalign/data/perplexity_filter.py, CCNet-style, after dedup and the filters; in the
    # parent process, or on Beam workers with runner="beam"): a jaxalign LM ("ckpt:PATH" or "hf:DIR", of architecture model.*) scores each kept document; ""
    # with perplexity_reference="" is off.
    perplexity_model: str = ""
    # A glob of reference text: the pretrain job (model.*, train.*, optim.* of this config) first trains a small LM
    # on it into W/curate_ref_lm, which then scores the documents (instead of perplexity_model).
    perplexity_reference: str = ""
    # Percentile cut points (two, increasing, in (0, 100)) of the scored documents' perplexities splitting them
    # into the buckets head (lowest perplexity), middle and tail, as CCNet's 33/67.
    perplexity_cuts: str = "33,67"
    # The buckets kept (comma-separated of head, middle, tail); the others are removed ("perplexity:<bucket>").
    perplexity_keep: str = "head,middle"
    # Documents per scoring batch (a multiple of the data-parallel size) and the tokens scored per document
    # (its first ones; lengths are padded to powers of two from 32, so a run compiles a few shapes).
    perplexity_batch_size: int = 16
    perplexity_max_tokens: int = 512

    def __post_init__(self):
        _check_ranges(CurateConfig, vars(self), "curate")
        if self.perplexity_model and not self.perplexity_model.startswith(("hf:", "ckpt:")):
            raise ConfigError(
                f"curate.perplexity_model={self.perplexity_model!r} must be '', 'ckpt:/path' or 'hf:/path'"
            )
        if self.perplexity_model and self.perplexity_reference:
            raise ConfigError(
                f"curate.perplexity_model={self.perplexity_model!r} and curate.perplexity_reference="
                f"{self.perplexity_reference!r}: give one (a model, or reference text to train one on)"
            )
        try:
            cuts = [float(x) for x in self.perplexity_cuts.split(",")]
        except ValueError:
            cuts = []
        if len(cuts) != 2 or not 0 < cuts[0] < cuts[1] < 100:
            raise ConfigError(
                f"curate.perplexity_cuts={self.perplexity_cuts!r} must be two increasing percentiles in (0, 100), "
                "e.g. '33,67'"
            )
        keep = [x.strip() for x in self.perplexity_keep.split(",") if x.strip()]
        if not keep or any(x not in ("head", "middle", "tail") for x in keep):
            raise ConfigError(
                f"curate.perplexity_keep={self.perplexity_keep!r} must be a comma-separated subset of "
                "head, middle, tail"
            )


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """Supervised fine-tuning (`job="sft"`): `data.*` chooses the records, templates and loss masks."""

    # Replay against forgetting: this share of the examples of every batch is pretraining text (a Grain mixture by
    # example count), from `replay_input` ("" = the synthetic world's pretraining split).
    replay_fraction: float = 0.0
    replay_input: str = ""
    # Held-out pretraining text whose loss is reported before and after SFT (forgetting); "" = the world's
    # pretraining eval split when the data is synthetic, else none.
    pretrain_eval_input: str = ""

    def __post_init__(self):
        _check_ranges(SftConfig, vars(self), "sft")


# The projections LoRA adapts by default: every attention and MLP weight matrix of every block.
LORA_DEFAULT_TARGETS = r"blocks/.*(wq|wk|wv|wo|w_gate|w_up|w_down)$"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Parameter-efficient fine-tuning (`jaxalign/peft`), read by every stage's shared state init.

    `rank` 0 is full fine-tuning; otherwise the base weights are frozen and each weight matrix whose module path
    ("blocks/attn/wq", "blocks/0/mlp/w_up" with unscanned layers) matches the regex `targets` (`re.search`) gets
    adapters A (rank x in) and B (out x rank) scaled by alpha / rank. `quantize="nf4"` stores the frozen targets as
    4-bit NormalFloat with double-quantised block scales (QLoRA)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = LORA_DEFAULT_TARGETS
    quantize: Literal["none", "nf4"] = "none"

    def __post_init__(self):
        _check_ranges(LoraConfig, vars(self), "lora")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"lora.targets={self.targets!r} is not a regular expression: {e}") from None
        if self.quantize != "none" and self.rank == 0:
            raise ConfigError(
                f"lora.quantize={self.quantize!r} needs lora.rank > 0 (a quantised base is frozen: only adapters "
                "train); got lora.rank=0"
            )


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Bradley-Terry reward model (`job="reward"`) over `prompt`/`chosen`/`rejected` records."""

    # TRL's center_rewards_coefficient: adds center_coef * (r_chosen + r_rejected)^2 (0 = off).
    center_coef: float = 0.0
    # A record field holding a margin the chosen reward must exceed the rejected one by ("" = none).
    margin_field: str = ""

    def __post_init__(self):
        _check_ranges(RewardConfig, vars(self), "reward")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation and its family (`job="dpo"`), and KTO (`job="kto"`).

    `objective`: "dpo" (pairs, with a frozen reference; `loss_type` picks the DPO variant), "simpo" (no reference,
    length-normalised, `simpo_gamma` margin) or "orpo" (no reference, odds ratio + NLL). KTO (unpaired
    desirable/undesirable examples) reads `beta`, `desirable_weight` and `undesirable_weight`.
    """

    objective: Literal["dpo", "simpo", "orpo"] = "dpo"
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down"
    ] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    # Weight of an SFT term on the chosen completions (TRL's rpo_alpha; 0 = off).
    rpo_alpha: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # The frozen reference: "live" keeps its weights in memory and runs it every step; "precomputed" runs it once
    # over the data and caches its log-probs next to the data (workdir/reference_logps/), so steps hold one model.
    reference: Literal["live", "precomputed"] = "live"

    def __post_init__(self):
        _check_ranges(DpoConfig, vars(self), "dpo")


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    """Group relative policy optimisation (`job="grpo"`) with verifiable rewards: per step, `train.batch_size /
    num_generations` prompts, `num_generations` sampled completions each (so `train.batch_size` counts completions,
    as TRL's generation batch), rewards, group advantages and `num_iterations` clipped updates (TRL 1.16 semantics:
    `loss_type` dapo, grpo, bnpo or dr_grpo; `importance_sampling_level="sequence"` is GSPO)."""

    num_generations: int = 4
    max_completion_length: int = 32
    temperature: float = 1.0
    # top_k=0 and top_p=1.0 keep every token.
    top_k: int = 0
    top_p: float = 1.0
    num_iterations: int = 1
    epsilon: float = 0.2
    # The upper clip (DAPO's clip-higher); 0 means the same as `epsilon`.
    epsilon_high: float = 0.0
    # Weight of the k3 KL to the reference (the initial policy); 0 holds no reference model.
    beta: float = 0.0
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # Advantage scale: per-group std ("group"), std over the whole batch ("batch"), or none (Dr. GRPO).
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # Reward functions (jaxalign.rl.rewards: "answer", "format", "restate", "reward_model") and their weights (() = all 1).
    reward_funcs: tuple[str, ...] = ("answer", "format")
    reward_weights: tuple[float, ...] = ()
    # The trained reward model for the "reward_model" reward function: a `checkpoints/reward` directory.
    reward_model: str = ""
    # DAPO dynamic sampling, as a filter: groups whose rewards are all equal (zero advantage) are left out of the
    # loss and its normaliser (counted in `frac_reward_zero_std` either way).
    filter_zero_std: bool = False
    # DAPO soft overlong punishment: completions longer than max_completion_length - overlong_buffer tokens lose up
    # to overlong_penalty reward, linearly (0 = off).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0

    def __post_init__(self):
        from jaxalign.rl import rewards

        _check_ranges(GrpoConfig, vars(self), "grpo")
        rewards.check_names(self.reward_funcs)
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"grpo.reward_weights={self.reward_weights} needs one weight per grpo.reward_funcs="
                f"{self.reward_funcs} (or none: all 1.0)"
            )
        if ("reward_model" in self.reward_funcs) != bool(self.reward_model):
            raise ConfigError(
                f"grpo.reward_model={self.reward_model!r} and grpo.reward_funcs={self.reward_funcs}: the "
                "'reward_model' reward function needs grpo.reward_model (a checkpoints/reward directory), and only it"
            )
        if not 0 <= self.overlong_buffer < self.max_completion_length:
            raise ConfigError(
                f"grpo.overlong_buffer={self.overlong_buffer} must be in [0, grpo.max_completion_length="
                f"{self.max_completion_length})"
            )


@dataclasses.dataclass(frozen=True)
class PpoConfig:
    """PPO with a learned reward model (`job="ppo"`), TRL 1.16 PPOTrainer semantics: per step `train.batch_size`
    prompts, one sampled completion each, scored by the frozen RM at its last token; per-token KL penalty to the
    frozen reference, GAE, whitened advantages, then `num_ppo_epochs` passes over `num_mini_batches` minibatches
    updating the policy and the value model (one optimizer, loss = policy loss + vf_coef * value loss)."""

    # The trained reward model: a `checkpoints/reward` directory (or one of its steps).
    reward_model: str = ""
    # The RM's tokenizer; "" = its run's (saved data.tokenizer, else its workdir's tokenizer.model). When it differs
    # from the policy's, completions are decoded and re-encoded for the RM.
    reward_tokenizer: str = ""
    # The value model's start: the RM's trunk and head ("reward", needs the RM to share the policy's tokenizer) or
    # the policy's trunk with a fresh head ("policy").
    value_init: Literal["reward", "policy"] = "reward"
    max_completion_length: int = 32
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    # Subtracted from the score of a completion without a stop token (0 = off; TRL's default None).
    missing_eos_penalty: float = 0.0
    kl_coef: float = 0.05
    kl_estimator: Literal["k1", "k3"] = "k1"
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    # > 0: before PPO, train the SFT policy (when model.init_from is empty) and the RM (when reward_model is empty)
    # in this workdir for this many steps each (the `:smoke` config runs from an empty workdir this way).
    bootstrap_steps: int = 0

    def __post_init__(self):
        _check_ranges(PpoConfig, vars(self), "ppo")


@dataclasses.dataclass(frozen=True)
class StageRun:
    """What differs between the stages of one pipeline run (`job="pipeline"`); a 0 (or -1 where 0 is meaningful)
    keeps the value of the top-level `train`/`optim`/`checkpoint` sections."""

    steps: int = 0
    batch_size: int = 0
    seq_len: int = 0
    lr: float = 0.0
    warmup_steps: int = -1
    eval_every: int = -1
    every_steps: int = 0

    def __post_init__(self):
        _check_ranges(StageRun, vars(self), "pipeline.<stage>")


PIPELINE_STAGES = ("curate", "pretrain", "sft", "reward", "dpo", "kto", "ppo", "grpo", "eval")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The end-to-end job (`job="pipeline"`, jaxalign/pipeline.py): which stages run, in order, in one workdir, each
    reading the previous stage's checkpoint; and each stage's own steps, batch, length and learning rate."""

    # Comma-separated, a subsequence of: curate, pretrain, sft, reward, dpo, kto, ppo, grpo, eval.
    stages: str = "curate,pretrain,sft,reward,dpo"
    # --- Pipeline *parallelism* over the `stage` mesh axis (jaxalign/parallel/pipeline.py), used by every job when
    # mesh.stage > 1. These three keys are not about `stages` above (the end-to-end job's list of training stages).
    # "gpipe" (all forwards, then all backwards), "circular" (`repeats` virtual stages per device: a smaller
    # bubble for more stage-to-stage transfers) or "1f1b" (GPipe's bubble, activations of at most 2 stages - 1
    # microbatches per stage instead of all of them: for many microbatches; not with LoRA or with objectives that
    # run the layers twice, such as DPO with a live reference model).
    schedule: Literal["gpipe", "circular", "1f1b"] = "gpipe"
    # Microbatches the (gradient-accumulation) batch is split into as it flows through the stages; 0 = mesh.stage.
    microbatches: int = 0
    # Virtual stages per device for schedule="circular" (layer l runs on device (l // layers_per_virtual) % stage);
    # 1 for every other schedule.
    repeats: int = 1
    pretrain: StageRun = dataclasses.field(default_factory=StageRun)
    sft: StageRun = dataclasses.field(default_factory=StageRun)
    reward: StageRun = dataclasses.field(default_factory=StageRun)
    dpo: StageRun = dataclasses.field(default_factory=StageRun)
    kto: StageRun = dataclasses.field(default_factory=StageRun)
    ppo: StageRun = dataclasses.field(default_factory=StageRun)
    grpo: StageRun = dataclasses.field(default_factory=StageRun)

    def __post_init__(self):
        _check_ranges(PipelineConfig, vars(self), "pipeline")
        if self.repeats > 1 and self.schedule != "circular":
            raise ConfigError(
                f"pipeline.repeats={self.repeats} needs pipeline.schedule='circular', got {self.schedule!r}"
            )
        names = [n.strip() for n in self.stages.split(",") if n.strip()]
        unknown = [n for n in names if n not in PIPELINE_STAGES]
        if unknown or not names:
            raise ConfigError(
                f"pipeline.stages={self.stages!r}: unknown stage(s) {unknown}; known: {list(PIPELINE_STAGES)}"
            )
        order = [PIPELINE_STAGES.index(n) for n in names]
        if order != sorted(set(order)):
            raise ConfigError(
                f"pipeline.stages={self.stages!r} must list each stage once, in the order {list(PIPELINE_STAGES)}"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in self.stages.split(",") if n.strip())


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (`job="eval"`) of the policy `model.init_from` (`jaxalign/eval/evaluate.py`).

    Checkpoints are `ckpt:PATH` or `hf:DIR` strings (as model.init_from), with the policy's architecture.
    """

    # Score the synthetic world's held-out splits (data.synthetic_* choose the world): fact QA, arithmetic,
    # perplexity, and chat prompts for win rate, reward and length.
    world: bool = True
    # The baseline policy for win_rate_vs_sft (the SFT checkpoint); "" = no win rate.
    baseline: str = ""
    # A reward model checkpoint directory (W/checkpoints/reward) for mean_rm_score, the RM-judged win rate and
    # rm_pair_accuracy; "" = none.
    reward_model: str = ""
    # The reference policy for kl_to_ref; "" = no KL.
    reference: str = ""
    # A policy used as LLM judge (position-swapped) for win_rate_vs_sft_llm; "" = none.
    judge_model: str = ""
    kl_estimator: Literal["k1", "k3"] = "k3"
    # User multiple-choice JSONL (question, choices, answer), scored by log-likelihood; "" = none.
    mc_input: str = ""
    max_new_tokens: int = 32
    # Sampling temperature of the answers (0: greedy). KL always samples at temperature 1.
    temperature: float = 0.0
    batch_size: int = 16
    # At most this many examples per task (0: all).
    max_examples: int = 0
    # The key of this policy's metrics in workdir/eval.json (other keys already there are kept).
    name: str = "policy"
    # A curation run's W/contamination.json: each score is also reported on the items it does not list as
    # contaminated (qa_exact_match_clean from its world_qa benchmark; mc_acc_clean, mc_acc_norm_clean and
    # mc_count_clean from its other benchmarks); "" = none.
    contamination: str = ""

    def __post_init__(self):
        _check_ranges(EvalConfig, vars(self), "eval")
        for key in ("baseline", "reference", "judge_model"):
            value = getattr(self, key)
            if value and not value.startswith(("hf:", "ckpt:")):
                raise ConfigError(f"eval.{key}={value!r} must be '', 'ckpt:/path' or 'hf:/path'")
        if not self.name:
            raise ConfigError("eval.name is empty: it names the metrics in eval.json")
