"""Hugging Face <-> jaxalign mappings: `config.json` <-> `ModelConfig`, and parameter paths <-> tensor names.

Families: llama (incl. Llama 3.1 `llama3` RoPE scaling), mistral, qwen2 (q/k/v biases), qwen3 (q/k RMSNorm over the
head dim, explicit `head_dim`) and gemma (1 + w norms, embeddings scaled by sqrt(d_model), gelu-tanh MLP, tied).
All five share one tensor layout (`model.layers.{i}.self_attn.q_proj.weight`, ...); only the configs differ.

Kernels: jaxalign stores (in, out); a torch `nn.Linear` weight is (out, in), so kernels are transposed on the way in
and out. Q/K need no permutation: HF checkpoints already use the rotate-half RoPE layout of `apply_rope`. Gemma's norm
weights are stored as w (the model computes 1 + w), exactly as in jaxalign.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxalign.config import ModelConfig
from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    # transformers' class defaults for the keys a config.json may leave out.
    defaults: dict[str, Any]


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            dict(
                rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, hidden_act="silu"
            ),
        ),
        Family(
            "mistral",
            "MistralForCausalLM",
            dict(
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                max_position_embeddings=4096 * 32,
                hidden_act="silu",
                num_key_value_heads=8,
                sliding_window=4096,
            ),
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            dict(
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                max_position_embeddings=32768,
                hidden_act="silu",
                num_key_value_heads=32,
            ),
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            dict(
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                max_position_embeddings=32768,
                hidden_act="silu",
                num_key_value_heads=32,
                head_dim=128,
            ),
        ),
        Family(
            "gemma",
            "GemmaForCausalLM",
            dict(
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                max_position_embeddings=8192,
                hidden_act="gelu_pytorch_tanh",
                num_key_value_heads=16,
                head_dim=256,
            ),
        ),
    )
}

# ModelConfig fields a checkpoint determines, with the config.json key each comes from (for error messages).
ARCH_FIELDS: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "d_ff": "intermediate_size",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling.rope_type",
    "norm_eps": "rms_norm_eps",
    "norm_plus_one": "model_type",
    "qkv_bias": "model_type",
    "qk_norm": "model_type",
    "tie_embeddings": "tie_word_embeddings",
    "scale_embeddings": "model_type",
    "activation": "hidden_act",
}
LLAMA3_FIELDS: dict[str, str] = {
    "rope_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_len": "rope_scaling.original_max_position_embeddings",
}


def _require(hf: dict, key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{where}: config.json has no {key!r}")
    return hf[key]


def _rope(hf: dict, where: str) -> dict[str, Any]:
    """ModelConfig rope fields from either the legacy (`rope_theta` + `rope_scaling`) or the transformers-5
    (`rope_parameters`) layout."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={partial} is not supported (only full rotary)")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": ""}
    if rope_type == "default":
        return out
    if rope_type != "llama3":
        raise ConfigError(
            f"{where}: rope_scaling.rope_type={rope_type!r} is not supported; accepted: 'default', 'llama3'"
        )
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if params.get(key) is None:
            raise ConfigError(f"{where}: llama3 rope_scaling has no {key!r}")
    return dict(
        out,
        rope_scaling="llama3",
        rope_factor=float(params["factor"]),
        rope_low_freq_factor=float(params["low_freq_factor"]),
        rope_high_freq_factor=float(params["high_freq_factor"]),
        rope_original_max_len=int(
            params.get("original_max_position_embeddings") or _require(hf, "max_position_embeddings", where)
        ),
    )


def _sliding_window(hf: dict, family: Family, n_layers: int) -> int | None:
    """The attention window if any layer slides (as transformers decides it), else None."""
    if family.model_type == "mistral":
        return hf.get("sliding_window", family.defaults["sliding_window"])
    if family.model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and hf.get("sliding_window"):
        layer_types = hf.get("layer_types")
        if layer_types is not None:
            sliding = "sliding_attention" in layer_types
        else:
            sliding = n_layers > hf.get("max_window_layers", 28)
        return hf["sliding_window"] if sliding else None
    return None


def model_config(hf_config: dict, *, where: str = "config.json", **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face `config.json` (as a dict); `overrides` set non-architecture fields
    (`compute_dtype`, `scan_layers`, `remat`, `attention`, ...). Unsupported features raise `ConfigError`.

    A sliding attention window (Mistral v0.1, Qwen with `use_sliding_window`) caps `max_seq_len` at the window:
    up to that length, full causal attention is exactly what the checkpoint computes."""
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{where}: model_type={model_type!r} is not supported; accepted: {sorted(FAMILIES)}"
        )
    family = FAMILIES[model_type]
    hf = {**family.defaults, **hf}
    # Flags of these families that change the computation in ways the jaxalign model does not implement.
    unsupported = {"llama": ("attention_bias", "mlp_bias"), "qwen3": ("attention_bias",)}.get(model_type, ())
    if model_type == "gemma":
        unsupported = ("attention_bias", "use_bidirectional_attention")
    for key in unsupported:
        if hf.get(key):
            raise ConfigError(f"{where}: {key}={hf[key]} is not supported for model_type={model_type!r}")
    act = hf["hidden_act"]
    if model_type == "gemma":
        # transformers maps Gemma's legacy "gelu" to the tanh approximation the checkpoints were trained with.
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ConfigError(
                f"{where}: hidden_act={act!r} is not supported for gemma; accepted: gelu_pytorch_tanh"
            )
        # `hidden_activation` (the published configs carry it; transformers 4.38-4.x read it instead of hidden_act)
        # names the MLP activation explicitly: another value than the tanh approximation (exact "gelu") is a model
        # jaxalign does not implement, so it is refused rather than silently run with gelu-tanh.
        explicit = hf.get("hidden_activation")
        if explicit is not None and explicit != "gelu_pytorch_tanh":
            raise ConfigError(
                f"{where}: hidden_activation={explicit!r} is not supported for gemma; accepted: gelu_pytorch_tanh"
            )
        activation = "gelu_tanh"
    else:
        if act not in ("silu", "swish"):
            raise ConfigError(
                f"{where}: hidden_act={act!r} is not supported for {model_type}; accepted: silu"
            )
        activation = "silu"
    d_model = int(_require(hf, "hidden_size", where))
    n_heads = int(_require(hf, "num_attention_heads", where))
    n_layers = int(_require(hf, "num_hidden_layers", where))
    max_seq_len = int(_require(hf, "max_position_embeddings", where))
    window = _sliding_window(hf, family, n_layers)
    if window is not None:
        max_seq_len = min(max_seq_len, int(window))
    fields = dict(
        vocab_size=int(_require(hf, "vocab_size", where)),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or d_model // n_heads),
        d_ff=int(_require(hf, "intermediate_size", where)),
        max_seq_len=max_seq_len,
        norm_eps=float(hf["rms_norm_eps"]),
        norm_plus_one=model_type == "gemma",
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        scale_embeddings=model_type == "gemma",
        activation=activation,
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope(hf, where),
    )
    bad = sorted(set(overrides) & (set(ARCH_FIELDS) | set(LLAMA3_FIELDS)))
    if bad:
        raise ConfigError(f"model.{bad[0]} comes from the checkpoint's {where} and cannot be overridden")
    cfg = ModelConfig(**{**fields, **overrides})
    if window is not None and cfg.max_seq_len > window:
        raise ConfigError(
            f"model.max_seq_len={cfg.max_seq_len} exceeds the checkpoint's sliding_window={window} ({where}); "
            f"jaxalign attends over the full context, which matches the checkpoint only up to the window"
        )
    return cfg


def check_matches(cfg: ModelConfig, hf_config: dict, where: str = "config.json") -> None:
    """Raises `ConfigError` naming the first architecture field where a training config disagrees with a
    checkpoint's config.json. `max_seq_len` may differ (context extension), except past a sliding window."""
    checkpoint = model_config(hf_config, where=where)
    names = dict(ARCH_FIELDS)
    if checkpoint.rope_scaling == "llama3":
        names.update(LLAMA3_FIELDS)
    for field, hf_key in names.items():
        mine, theirs = getattr(cfg, field), getattr(checkpoint, field)
        if mine != theirs:
            raise ConfigError(
                f"model.{field}={mine!r} does not match the checkpoint ({hf_key} in {where} gives {theirs!r})"
            )
    family = FAMILIES[hf_config["model_type"]]
    window = _sliding_window({**family.defaults, **hf_config}, family, checkpoint.n_layers)
    if window is not None and cfg.max_seq_len > window:
        raise ConfigError(
            f"model.max_seq_len={cfg.max_seq_len} exceeds the checkpoint's sliding_window={window} ({where}); "
            f"jaxalign attends over the full context, which matches the checkpoint only up to the window"
        )


def infer_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face family that computes exactly what `cfg` computes (Llama when several would)."""
    if cfg.norm_plus_one or cfg.scale_embeddings or cfg.activation == "gelu_tanh":
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "llama"


def _check_representable(cfg: ModelConfig, model_type: str) -> None:
    gemma = model_type == "gemma"
    wanted = dict(
        norm_plus_one=gemma,
        scale_embeddings=gemma,
        activation="gelu_tanh" if gemma else "silu",
        qk_norm=model_type == "qwen3",
        qkv_bias=model_type == "qwen2",
    )
    if gemma:
        wanted["tie_embeddings"] = True
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ConfigError(
                f"model.{field}={getattr(cfg, field)!r} cannot be saved as model_type={model_type!r} "
                f"(which needs {value!r})"
            )


def hf_config(cfg: ModelConfig, model_type: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` dict that transformers (4.x and 5.x) loads into a model computing what `cfg` computes."""
    model_type = model_type or infer_model_type(cfg)
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type={model_type!r} is not supported; accepted: {sorted(FAMILIES)}")
    _check_representable(cfg, model_type)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = dict(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
        rope = dict(rope_scaling, rope_theta=cfg.rope_theta)
    out: dict[str, Any] = dict(
        architectures=[FAMILIES[model_type].architecture],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="gelu_pytorch_tanh" if model_type == "gemma" else "silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        # Both layouts: transformers 4.x reads rope_theta/rope_scaling, 5.x rope_parameters.
        rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_dropout=0.0,
        use_cache=True,
        torch_dtype=dtype,
        dtype=dtype,
    )
    if model_type in ("llama", "qwen3", "gemma"):
        out["attention_bias"] = False
    if model_type == "gemma":
        out["hidden_activation"] = "gelu_pytorch_tanh"  # what transformers 4.x reads (5.x reads hidden_act)
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = None
    if model_type in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    return out


# Parameter paths inside a Block -> (tensor name under `model.layers.{i}.`, transposed).
BLOCK_TENSORS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("attn_norm", "scale"): ("input_layernorm.weight", False),
    ("attn", "wq"): ("self_attn.q_proj.weight", True),
    ("attn", "wk"): ("self_attn.k_proj.weight", True),
    ("attn", "wv"): ("self_attn.v_proj.weight", True),
    ("attn", "wo"): ("self_attn.o_proj.weight", True),
    ("attn", "bq"): ("self_attn.q_proj.bias", False),
    ("attn", "bk"): ("self_attn.k_proj.bias", False),
    ("attn", "bv"): ("self_attn.v_proj.bias", False),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", False),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", False),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", True),
    ("mlp", "w_up"): ("mlp.up_proj.weight", True),
    ("mlp", "w_down"): ("mlp.down_proj.weight", True),
}
TOP_TENSORS: dict[tuple[str, ...], tuple[str, bool]] = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("final_norm", "scale"): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
}
# Tensors some checkpoints carry that the model recomputes or shares.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """Where one jaxalign parameter lives in a checkpoint: one tensor, or one per layer when `stacked` (the
    parameter's leading axis is `layers`, as with `scan_layers`)."""

    names: tuple[str, ...]
    transpose: bool
    stacked: bool


def tensor_map(path: tuple[Any, ...], cfg: ModelConfig) -> TensorMap:
    """The checkpoint tensor(s) of the parameter at `path` in the model's flat state."""
    path = tuple(path)
    if path in TOP_TENSORS:
        name, transpose = TOP_TENSORS[path]
        return TensorMap((name,), transpose, stacked=False)
    if path and path[0] == "blocks":
        if cfg.scan_layers:
            rest, layers, stacked = path[1:], range(cfg.n_layers), True
        else:
            rest, layers, stacked = path[2:], (int(path[1]),), False
        if rest in BLOCK_TENSORS:
            suffix, transpose = BLOCK_TENSORS[rest]
            return TensorMap(tuple(f"model.layers.{i}.{suffix}" for i in layers), transpose, stacked)
    raise KeyError(f"no Hugging Face tensor for the parameter {'/'.join(map(str, path))}")
