"""The valid range of every numeric config key (`RANGES`), checked by each section of jaxalign/config.py
(and of its job-specific sections in jaxalign/config_stages.py).

Ranges are written as they read in an error: "> 0", ">= 0", "in [0, 1)", "-1 or > 0", optionally followed by a
note in parentheses (`ConfigError: checkpoint.every_steps=0 must be > 0`). tests/test_configs.py checks that every int
and float field of every section is listed here and that a value just outside each range is refused.
"""

from __future__ import annotations

import math
import re
from typing import Any

from jaxalign.errors import ConfigError

POSITIVE = "> 0"
# By section class name: each section's __post_init__ checks its keys (and `config.from_config_dict` checks them
# first, naming the full key).
RANGES: dict[str, dict[str, str]] = {
    "Config": {"seed": ">= 0"},
    "ModelConfig": {
        **dict.fromkeys(
            ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len"),
            POSITIVE,
        ),
        **dict.fromkeys(
            ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"), POSITIVE
        ),
        **dict.fromkeys(("rope_original_max_len", "norm_eps", "init_std"), POSITIVE),
    },
    "MeshConfig": dict.fromkeys(("data", "fsdp", "tensor", "stage"), "-1 or > 0 (-1: the remaining devices)"),
    "TrainConfig": {
        **dict.fromkeys(
            ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"), POSITIVE
        ),
        "eval_every": ">= 0 (0: no evaluation)",
        "z_loss": ">= 0",
        "logits_chunk": ">= 0 (0: no chunking)",
        "peak_flops": ">= 0 (0: measured or the known chip peak)",
        "ema_decay": "in [0, 1) (0: no EMA)",
    },
    "OptimConfig": {
        "lr": POSITIVE,
        "warmup_steps": ">= 0",
        "decay_steps": ">= 0 (0: until train.steps)",
        "min_lr_ratio": "in [0, 1]",
        "b1": "in [0, 1)",
        "b2": "in [0, 1)",
        "eps": POSITIVE,
        "weight_decay": ">= 0",
        "clip_norm": ">= 0 (0: no clipping)",
        "spike_window": ">= 2",
        "spike_sigma": POSITIVE,
    },
    "DataConfig": {
        "num_workers": ">= 0 (0: read in the training process)",
        "shards": ">= 0 (0: one per process)",
        "synthetic_entities": POSITIVE,
        "synthetic_seed": ">= 0",
        "synthetic_arith_max": POSITIVE,
        "synthetic_rl_arithmetic": ">= 0",
        "synthetic_sft_arithmetic": ">= 0",
        "synthetic_arith_docs": ">= 0",
        "synthetic_preference_per_person": POSITIVE,
        "max_prompt_length": POSITIVE,
    },
    "CheckpointConfig": {
        "every_steps": POSITIVE,
        "keep": POSITIVE,
        "keep_every": ">= 0 (0: none kept permanently)",
    },
    "CurateConfig": {
        **dict.fromkeys(("ngram", "num_bands", "rows_per_band", "num_workers"), POSITIVE),
        "near_threshold": "in [0, 1]",
        "substring_dedup_tokens": ">= 0 (0: off)",
        **dict.fromkeys(("decontam_n", "perplexity_batch_size", "perplexity_max_tokens"), POSITIVE),
    },
    "SftConfig": {"replay_fraction": "in [0, 1)"},
    "LoraConfig": {"rank": ">= 0 (0: full fine-tuning)", "alpha": POSITIVE, "dropout": "in [0, 1)"},
    "RewardConfig": {"center_coef": ">= 0"},
    "DpoConfig": {
        "beta": POSITIVE,
        "label_smoothing": "in [0, 0.5)",
        **dict.fromkeys(("simpo_gamma", "rpo_alpha", "desirable_weight", "undesirable_weight"), ">= 0"),
    },
    "GrpoConfig": {
        "num_generations": ">= 2 (advantages compare samples of a group)",
        "max_completion_length": POSITIVE,
        "temperature": "> 0 (GRPO samples)",
        "top_k": ">= 0 (0 keeps every token)",
        "top_p": "in (0, 1]",
        "num_iterations": POSITIVE,
        "epsilon": "in (0, 1)",
        "epsilon_high": ">= 0 (0: same as grpo.epsilon)",
        "beta": ">= 0",
        "overlong_buffer": ">= 0",
        "overlong_penalty": ">= 0",
    },
    "PpoConfig": {
        **dict.fromkeys(("max_completion_length", "num_ppo_epochs", "num_mini_batches"), POSITIVE),
        "temperature": "> 0 (PPO samples)",
        "top_k": ">= 0 (0 keeps every token)",
        "top_p": "in (0, 1]",
        **dict.fromkeys(("cliprange", "cliprange_value"), POSITIVE),
        **dict.fromkeys(("kl_coef", "vf_coef", "missing_eos_penalty", "bootstrap_steps"), ">= 0"),
        **dict.fromkeys(("gamma", "lam"), "in [0, 1]"),
    },
    "PipelineConfig": {
        "microbatches": ">= 0 (0: mesh.stage microbatches)",
        "repeats": "> 0 (virtual stages per device; > 1 only with schedule='circular')",
    },
    "StageRun": {
        **dict.fromkeys(("steps", "batch_size", "seq_len", "every_steps"), ">= 0 (0 keeps the default)"),
        "lr": ">= 0 (0 keeps optim.lr)",
        **dict.fromkeys(("warmup_steps", "eval_every"), ">= -1 (-1 keeps the default)"),
    },
    "EvalConfig": {
        **dict.fromkeys(("max_new_tokens", "batch_size"), POSITIVE),
        "temperature": ">= 0 (0: greedy)",
        "max_examples": ">= 0 (0: all)",
    },
}


def check_ranges(cls: type, values: dict[str, Any], section: str) -> None:
    """Raises a ConfigError naming `section.key` for the first value of `values` outside its range in RANGES."""
    for key, spec in RANGES.get(cls.__name__, {}).items():
        if key in values and not in_range(values[key], spec):
            raise ConfigError(f"{section + '.' if section else ''}{key}={values[key]!r} must be {spec}")


# "> a", ">= a", "in [a, b]" (brackets open or closed), optionally "-1 or " first; then an optional "(note)".
_RANGE = re.compile(r"(-1 or )?(?:(>=|>) (-?[\d.]+)|in ([\[(])(-?[\d.]+), (-?[\d.]+)([\])]))")


def in_range(value: float, spec: str) -> bool:
    """Whether `value` is in the range `spec` (a value of RANGES); NaN and infinities never are."""
    minus_one, op, bound, left, lo, hi, right = _RANGE.match(spec).groups()
    if not math.isfinite(value):
        return False
    if minus_one and value == -1:
        return True
    if op:
        return value > float(bound) if op == ">" else value >= float(bound)
    above = value >= float(lo) if left == "[" else value > float(lo)
    below = value <= float(hi) if right == "]" else value < float(hi)
    return above and below
