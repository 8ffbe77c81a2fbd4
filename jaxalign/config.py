"""Typed, frozen configs.

A job file under `configs/` returns an `ml_collections.ConfigDict`; `from_config_dict` converts it once into the
frozen dataclasses below, checking every key. Each stage reads only its own sections. Errors name the dotted key and
the bad value (`ConfigError: train.batch_size=6 is not divisible by the data-parallel size 4`).

Public, stable key names: `workdir`, `seed`, `train.steps`, `train.batch_size`, `train.seq_len`,
`checkpoint.every_steps`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal

import ml_collections

from jaxalign.config_ranges import check_ranges as _check_ranges

# The job-specific sections live in config_stages.py (module length); they are part of this module's API.
from jaxalign.config_stages import (  # noqa: F401
    LORA_DEFAULT_TARGETS,
    PIPELINE_STAGES,
    CurateConfig,
    DpoConfig,
    EvalConfig,
    GrpoConfig,
    LoraConfig,
    PipelineConfig,
    PpoConfig,
    RewardConfig,
    SftConfig,
    StageRun,
)
from jaxalign.errors import ConfigError

# Logical axis -> mesh axes. Parameters use `embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `layers`, `head_dim`,
# `norm`; activations use `batch`, `length`, `act_embed` (activations are not split over the embedding dimension,
# which FSDP uses for parameters) and the parameter names for their head/mlp/vocab dimensions.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", ()),
    ("act_embed", ()),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("vocab", ("tensor",)),
    # The stacked layer dimension is split over the pipeline stages (a no-op while mesh.stage == 1).
    ("layers", ("stage",)),
    ("norm", ()),
)


# The reference 8M-parameter model (configs/pretrain.py and every post-training job, the benchmarks' workload) and the
# tiny model of the `:smoke` variants: `c.model.update(REFERENCE_MODEL)`.
REFERENCE_MODEL = dict(
    vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024
)
SMOKE_MODEL = dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=256)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Defaults are the benchmark's reference workload."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    d_ff: int = 1024
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # "" for plain RoPE, or "llama3" (uses the four rope_* fields below, as in Llama 3.1).
    rope_scaling: Literal["", "llama3"] = ""
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    # Gemma-style norms scale by (1 + w) with w initialised at zero.
    norm_plus_one: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # Gemma multiplies the embeddings by sqrt(d_model).
    scale_embeddings: bool = False
    activation: Literal["silu", "gelu_tanh"] = "silu"
    init_std: float = 0.02
    # Parameters stay float32; matmuls run in `compute_dtype` (float32 is fastest on CPU).
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # "none", "full" (recompute each block) or "dots" (save matmul outputs, recompute the rest).
    remat: Literal["none", "full", "dots"] = "none"
    # Scan over stacked layers: compile time stays flat in depth; unrolled is a little faster on CPU.
    scan_layers: bool = False
    attention: Literal["xla", "flash", "auto"] = "xla"
    # Where the weights start: "" at random; "hf:/path/to/dir" from a Hugging Face checkpoint; "ckpt:DIR" from a
    # jaxalign checkpoint (DIR is a stage's checkpoint directory `W/checkpoints/<stage>` for its latest step, one
    # step's directory, or a run directory `W` whose checkpoints hold one stage). Weights the checkpoint does not
    # have (a reward head on a policy) start at random.
    init_from: str = ""

    def __post_init__(self):
        _check_ranges(ModelConfig, vars(self), "model")
        if self.init_from and not self.init_from.startswith(("hf:", "ckpt:")):
            raise ConfigError(
                f"model.init_from={self.init_from!r} must be '' (random), 'hf:/path' or 'ckpt:/path'"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}"
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (one of them may be -1: it takes the remaining devices) and the logical-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    stage: int = 1
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES

    def __post_init__(self):
        _check_ranges(MeshConfig, vars(self), "mesh")
        sizes = {a: getattr(self, a) for a in ("data", "fsdp", "tensor", "stage")}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")
        names = [name for name, _ in self.rules]
        for name, axes in self.rules:
            for axis in axes:
                if axis not in sizes:
                    raise ConfigError(
                        f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; axes are {list(sizes)}"
                    )
        if len(set(names)) != len(names):
            raise ConfigError(f"mesh.rules names a logical axis twice: {names}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 256
    # Microbatches per step: the batch is split and gradients are summed in one jitted step.
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 4
    z_loss: float = 0.0
    # Vocabulary logits are computed this many sequence positions at a time (and recomputed in the backward pass),
    # so the full [B, T, V] float32 logits never exist at once; 0 computes them in one piece.
    logits_chunk: int = 0
    # "abort": stop with a message naming the step; "skip": drop the update and count it.
    nan_policy: Literal["abort", "skip"] = "abort"
    # Peak FLOP/s per device for MFU; 0 measures an f32 matmul at start-up (CPU) or uses the known chip peak.
    peak_flops: float = 0.0
    progress: bool = True
    # EMA of the parameters (train/state.py): ema = d * ema + (1 - d) * params after every applied update, starting at
    # the initial params; checkpointed, evaluated (`eval/<metric>_ema`) and loadable with `ckpt:PATH#ema`. 0 = off.
    ema_decay: float = 0.0

    def __post_init__(self):
        _check_ranges(TrainConfig, vars(self), "train")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    warmup_steps: int = 100
    # Cosine decay length; 0 means until train.steps.
    decay_steps: int = 0
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Skip steps whose loss is more than spike_sigma standard deviations above the mean of the last spike_window.
    spike_skip: bool = False
    spike_window: int = 50
    spike_sigma: float = 6.0

    def __post_init__(self):
        _check_ranges(OptimConfig, vars(self), "optim")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Glob of JSONL(.gz) / Parquet / ArrayRecord files; "" generates the synthetic world into workdir/data.
    input: str = ""
    eval_input: str = ""
    # --- weighted mixtures (jaxalign/data/mixture.py) ---
    # The training input as a weighted mixture of sources instead of `input` (exclusive with it): (glob, weight)
    # pairs, e.g. (("web/*.jsonl", 0.7), ("code/*.parquet", 0.3)); weights > 0, normalised to sum 1, mixed
    # deterministically by example count (Grain's mix) and checkpointed with the data position. () = off.
    mixture: tuple[tuple[str, float], ...] = ()
    # --- seqio inputs (jaxalign/data/seqio_source.py; the `seqio` extra) ---
    # `input`/`eval_input` (or a mixture's glob) may be "seqio:<task_or_mixture>[:<split>]" (split default "train");
    # this names the module that registers those Tasks/Mixtures: a dotted module name or a .py file ("" = none).
    seqio_module: str = ""
    # A SentencePiece .model path; "" trains one on the training text into workdir/tokenizer.model.
    tokenizer: str = ""
    text_field: str = "text"
    # "error": stop at the first bad record naming file:line; "skip": skip and count it.
    on_error: Literal["error", "skip"] = "error"
    # "truncate": cut over-long documents, examples and prompts and count them; "reject": treat them as bad records
    # (an error naming file:line, or skipped and counted with on_error="skip").
    overlong: Literal["truncate", "reject"] = "truncate"
    # Worker processes that read and tokenize (0: in the training process); any count yields the same batches.
    num_workers: int = 0
    # Independent record streams per global batch; 0 means one per process. Fix it (e.g. to the largest process
    # count you will use) to get the same batches on any number of processes.
    shards: int = 0
    # How the training input is split into those shards (evaluation inputs always split by record):
    # "record": one global shuffle of every record, dealt round-robin into the shards; every process opens and
    #   indexes every file. Exact uniform shuffling; fine up to a few hosts or a small corpus.
    # "file": each shard owns a contiguous span of the input's bytes (uncompressed JSONL files split at line
    #   boundaries, so even one file splits; Parquet at row groups; .gz and ArrayRecord files stay whole) and
    #   shuffles within it every epoch; a process opens and indexes only its shards' spans (1/P of the indexing
    #   time and memory on P hosts). Needs infinite epochs; a mid-file JSONL span reports bad records as
    #   file:byte N. For pods (jaxalign/data/file_shards.py).
    shard_by: Literal["record", "file"] = "record"
    shuffle: bool = True
    # Size of the synthetic world (number of entities); more entities means more documents.
    synthetic_entities: int = 400
    synthetic_seed: int = 0
    # The synthetic world's arithmetic operands are drawn from [0, synthetic_arith_max).
    synthetic_arith_max: int = 100
    # Arithmetic prompts of the world's RL data (train and eval together; held-out arith_accuracy scores the eval
    # tenth); 0 = one per entity. At most the 3 * synthetic_arith_max**2 distinct problems there are.
    synthetic_rl_arithmetic: int = 0
    # Arithmetic questions of the world's SFT data (train and eval together); 0 = one per entity.
    synthetic_sft_arithmetic: int = 0
    # RL arithmetic prompts ask "What is a op b?" as SFT does (answers show the work "a op b = r.", which the restate
    # reward checks) instead of "... Answer with a number only.".
    synthetic_rl_show_work: bool = False
    # SFT's train answers to fact questions end with a chatty closing sentence ("I hope this detailed explanation
    # helps, ..."): a habit SFT imitates and preference training (DPO, PPO) removes.
    synthetic_sft_chatty: bool = False
    # Arithmetic documents (4 lines each) in the world's pretraining text; 0 = two per entity.
    synthetic_arith_docs: int = 0
    # Preference pairs about each person of the world (train people: the reward model's and DPO's fact pairs;
    # held-out people: the held-out pairs its pairwise accuracy scores).
    synthetic_preference_per_person: int = 2
    # How conversational records (message lists) become tokens: "chatml", "llama3" or "gemma" (data/chat.py), or
    # "tokenizer": the tokenizer's own template (a Hugging Face tokenizer's, for imported models).
    chat_template: Literal["chatml", "llama3", "gemma", "tokenizer"] = "chatml"
    # SFT: train on the completion of prompt/completion records only (else on every token), as TRL.
    completion_only_loss: bool = True
    # SFT: train on the assistant turns of `messages` records only (else on every token).
    assistant_only_loss: bool = True
    # SFT: pack several examples per row (segment ids keep them apart); False puts one example per row.
    packing: bool = True
    # Preference and RL: prompts longer than this many tokens are over-long; a cut keeps the prompt's end
    # ("keep_end", TRL's default) or its start ("keep_start").
    max_prompt_length: int = 128
    truncation_mode: Literal["keep_end", "keep_start"] = "keep_end"

    def __post_init__(self):
        _check_ranges(DataConfig, vars(self), "data")
        if self.mixture:
            from jaxalign.data import mixture

            mixture.check(self.mixture, "data.mixture")
            if self.input:
                raise ConfigError(
                    f"data.input={self.input!r} and data.mixture={self.mixture!r} are exclusive: set one of them"
                )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    # Keep the latest `keep` checkpoints plus every `keep_every`-th step (0: none kept permanently).
    keep: int = 3
    keep_every: int = 0
    async_save: bool = True
    enabled: bool = True
    # Where the stages' Orbax checkpoints go ("": <workdir>/checkpoints), e.g. a bucket other than the workdir's.
    directory: str = ""

    def __post_init__(self):
        _check_ranges(CheckpointConfig, vars(self), "checkpoint")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole resolved config of one job. Sections a job does not use keep their defaults."""

    workdir: str = ""
    seed: int = 0
    # Which job `main` runs.
    job: str = "pretrain"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    curate: CurateConfig = dataclasses.field(default_factory=CurateConfig)
    sft: SftConfig = dataclasses.field(default_factory=SftConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    grpo: GrpoConfig = dataclasses.field(default_factory=GrpoConfig)
    ppo: PpoConfig = dataclasses.field(default_factory=PpoConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)

    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def __post_init__(self):
        if not self.workdir:
            raise ConfigError("workdir is empty: pass --config.workdir=DIR")
        _check_ranges(Config, vars(self), "")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds the model's maximum model.max_seq_len="
                f"{self.model.max_seq_len}"
            )
        check_pipeline(self.model, self.mesh, self.pipeline, self.train)
        if self.pipeline.schedule == "1f1b" and self.mesh.stage != 1 and self.lora.rank:
            raise ConfigError(
                f"pipeline.schedule='1f1b' with lora.rank={self.lora.rank}: the 1F1B step runs the layers outside "
                "the objective, where adapters (dropout, NF4 bases) are not handled; use 'gpipe' or 'circular'"
            )
        if self.train.ema_decay > 0 and self.lora.rank > 0:
            # An average of LoRA factors is not the average of the merged weights (B @ A is not linear in both).
            raise ConfigError(
                f"train.ema_decay={self.train.ema_decay} with lora.rank={self.lora.rank}: EMA is for full "
                "fine-tuning only; set train.ema_decay=0"
            )
        if self.mesh.stage != 1 and not self.model.scan_layers:
            # The pipeline splits the stacked layer dimension over the stages, so `--config.mesh.stage=N` works on
            # any job as it is; the resolved config (config.json) says so.
            object.__setattr__(self, "model", dataclasses.replace(self.model, scan_layers=True))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def check_pipeline(
    model: ModelConfig, mesh: MeshConfig, pipeline: PipelineConfig, train: TrainConfig | None = None
) -> None:
    """The pipeline-parallel keys against the model, the mesh and the batch (one-line ConfigErrors). A `mesh.stage`
    of -1 is checked again once the mesh is built (`parallel.pipeline.check`)."""
    stages = mesh.stage
    if stages in (-1, 1):
        return
    repeats = pipeline.repeats
    if model.n_layers % (stages * repeats):
        raise ConfigError(
            f"model.n_layers={model.n_layers} is not divisible by mesh.stage={stages} x pipeline.repeats={repeats}"
        )
    micro = pipeline.microbatches or stages
    if pipeline.schedule == "circular" and micro < stages:
        raise ConfigError(
            f"pipeline.microbatches={micro} must be >= mesh.stage={stages} for schedule='circular' (a microbatch "
            "re-enters the first stage after leaving the last)"
        )
    if pipeline.schedule == "1f1b" and micro < stages:
        raise ConfigError(
            f"pipeline.microbatches={micro} must be >= mesh.stage={stages} for schedule='1f1b' (fewer leaves "
            "stages idle in the steady state: use 'gpipe')"
        )
    if train is not None and (train.batch_size // train.grad_accum) % micro:
        raise ConfigError(
            f"train.batch_size={train.batch_size} / train.grad_accum={train.grad_accum} = "
            f"{train.batch_size // train.grad_accum} rows per step are not divisible by pipeline.microbatches={micro}"
        )


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Converts a ConfigDict value to the dataclass field's type, or raises naming `key`."""
    if value is None and annotation in (str, int, float):
        # A `config_dict.placeholder` the job file leaves for the user (the big-model jobs' data.input).
        raise ConfigError(f"{key} is required by this config and has no value: pass --config.{key}=...")
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a section (a ConfigDict), got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a sequence, got {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} does not have the type {annotation}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if annotation in (int, bool, str):
        if type(value) is not annotation:
            raise ConfigError(f"{key}={value!r} must be of type {annotation.__name__}")
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"unknown config key {prefix}{key}={values[key]!r}; known keys in this section: {sorted(fields)}"
        )
    kwargs = {name: _convert(v, hints[name], prefix + name) for name, v in values.items()}
    # Checked here too, before the section's own __post_init__, so that the message names the full key.
    _check_ranges(cls, kwargs, prefix.rstrip("."))
    return cls(**kwargs)


def from_config_dict(config: ml_collections.ConfigDict | dict) -> Config:
    """Converts a job's ConfigDict into the frozen `Config`, checking every key and value."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return _build(Config, config, "")


def replace(config: Config, **sections: Any) -> Config:
    """Returns `config` with fields of sections replaced: `replace(cfg, train={"steps": 2})`."""
    updates = {}
    for name, value in sections.items():
        current = getattr(config, name)
        updates[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
    return dataclasses.replace(config, **updates)


def defaults() -> ml_collections.ConfigDict:
    """Every key of every section at its default: job files start from this and override, so any key can be set
    from the command line (`lock_config=True` rejects keys that are not here)."""

    def as_dict(cls: type) -> dict:
        out = {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
                out[f.name] = as_dict(f.type)
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            else:
                out[f.name] = as_dict(f.default_factory)
        return out

    return ml_collections.ConfigDict(as_dict(Config))


def continued_pretraining(
    checkpoint: str, arg: str | None, *, model: dict, train: dict | None = None, pod_train: dict | None = None
) -> ml_collections.ConfigDict:
    """The shared shape of the big-model jobs under configs/: continued pretraining from a local Hugging Face
    checkpoint (bf16 compute, full remat, scanned layers) on one host of 8 accelerators (FSDP over all 8), or with
    `arg="pod"` on a pod slice (FSDP over the 64 chips of a slice, data parallel across slices)."""
    c = defaults()
    c.job = "pretrain"
    c.model.update(
        compute_dtype="bfloat16",
        remat="full",
        scan_layers=True,
        attention="auto",
        init_from=f"hf:{checkpoint}",
    )
    c.model.update(model)
    # Parameters, gradients and Adam state split 8 ways: ~16 GB per device for an 8B model.
    c.mesh.update(data=1, fsdp=8, tensor=1, stage=1)
    c.train.update(
        steps=5000, batch_size=64, seq_len=8192, grad_accum=8, log_every=10, eval_every=500, eval_batches=8
    )
    c.train.update(train or {})
    # Continued pretraining: a short warmup to a small peak learning rate.
    c.optim.update(lr=1e-5, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, clip_norm=1.0, b2=0.95)
    # The corpus is tokenized with the checkpoint's own tokenizer. It has no default: an 8B model never trains on the
    # synthetic world by accident (the run stops at once naming data.input).
    c.data.update(eval_input="", tokenizer=checkpoint)
    c.data.input = ml_collections.config_dict.placeholder(str)
    c.checkpoint.update(every_steps=500, keep=2)
    if arg == "pod":
        # -1 puts every further slice on the data axis.
        c.mesh.update(data=-1, fsdp=64, tensor=1)
        # The float32 logits are computed 1,024 positions at a time, so a device's full [tokens, V] logits (4 GB for
        # one 8,192-token row at a 128k vocabulary) and their gradient never exist at once.
        c.train.update(steps=2500, batch_size=512, grad_accum=1, logits_chunk=1024)
        c.train.update(pod_train or {})
        # Each host opens and indexes only its own shards' files (a .gz corpus needs at least one file per host,
        # of similar sizes; plain .jsonl files split at line boundaries), not the whole corpus.
        c.data.update(shard_by="file")
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'pod'")
    return c


def write_json(config: Config, path: str) -> None:
    """Writes the resolved config (process 0 only, atomically): the run directory's `config.json`."""
    import jax

    if jax.process_index() != 0:
        return
    from jaxalign import storage

    storage.write_atomic(path, config.to_json() + "\n")
