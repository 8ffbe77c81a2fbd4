"""Every config under configs/ (and every `:arg` its header documents) resolves and builds its model under
`jax.eval_shape`; the Hugging Face templates have the published parameter counts, agree with the published
config.json, and really shard their weights over the mesh they ask for."""

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
import typing

import jax
import ml_collections
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from jaxalign import config as config_lib
from jaxalign.config_ranges import RANGES, in_range
from jaxalign.models import hf_mappings
from jaxalign.models.transformer import Transformer
from jaxalign.parallel.mesh import AXES, Rules, mesh_shape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))

# config.json of the published checkpoints (the keys that matter), and their parameter counts.
PUBLISHED = {
    "llama3_8b": (
        8_030_261_248,
        dict(
            model_type="llama",
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            hidden_act="silu",
            max_position_embeddings=131072,
            rms_norm_eps=1e-05,
            rope_theta=500000.0,
            rope_scaling=dict(
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
                rope_type="llama3",
            ),
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
    ),
    "mistral_7b": (
        7_248_023_552,
        dict(
            model_type="mistral",
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-05,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
        ),
    ),
    "qwen25_7b": (
        7_615_616_512,
        dict(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            hidden_act="silu",
            max_position_embeddings=131072,
            max_window_layers=28,
            rms_norm_eps=1e-06,
            rope_theta=1000000.0,
            sliding_window=131072,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3_8b": (
        8_190_735_360,
        dict(
            model_type="qwen3",
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=40960,
            rms_norm_eps=1e-06,
            rope_scaling=None,
            rope_theta=1000000,
            sliding_window=None,
            use_sliding_window=False,
            tie_word_embeddings=False,
            attention_bias=False,
        ),
    ),
    "gemma_7b": (
        8_537_680_896,
        dict(
            model_type="gemma",
            vocab_size=256000,
            hidden_size=3072,
            intermediate_size=24576,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=16,
            head_dim=256,
            hidden_act="gelu",
            max_position_embeddings=8192,
            rms_norm_eps=1e-06,
            rope_theta=10000.0,
        ),
    ),
}


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(f"configs_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def abstract_params(cfg) -> list[tuple[tuple[int, ...], tuple[str, ...]]]:
    """(shape, logical axes) of every parameter, from `jax.eval_shape` of the model's init (once per model: an 8B
    init traces in ~5 s, and the :pod variants share the model)."""
    _, abstract = jax.eval_shape(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0))))
    return [(tuple(v.shape), tuple(v.get_metadata()["axes"])) for _, v in nnx.to_flat_state(abstract)]


def documented_args(path: str) -> list[str | None]:
    """None plus every `configs/<name>.py:<arg>` the file's own header mentions."""
    name = os.path.basename(path)
    text = open(path, encoding="utf-8").read()
    return [None, *sorted(set(re.findall(rf"configs/{re.escape(name)}:(\w+)", text)))]


CASES = [
    pytest.param(path, arg, id=f"{os.path.basename(path)[:-3]}{':' + arg if arg else ''}")
    for path in CONFIG_FILES
    for arg in documented_args(path)
]


def test_the_hf_templates_are_here():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    assert set(PUBLISHED) <= names


@pytest.mark.parametrize("path,arg", CASES)
def test_config_builds_its_model(path, arg, tmp_path):
    raw: ml_collections.ConfigDict = load_module(path).get_config(arg)
    if "model" not in raw:
        pytest.skip(f"job {raw.get('job')!r} has no model")
    raw.workdir = str(tmp_path)
    name = os.path.basename(path)[:-3]
    if name in PUBLISHED:
        # An 8B model never trains on the synthetic world by accident: the corpus has no default.
        with pytest.raises(config_lib.ConfigError, match=r"^data\.input is required by this config"):
            config_lib.from_config_dict(raw)
        raw.data.input = "/corpus/*.jsonl.gz"
        # The pod variants compute the vocabulary logits 1,024 positions at a time.
        assert raw.train.logits_chunk == (1024 if arg == "pod" else 0)
        # ... and each host indexes only its own shards of the corpus.
        assert raw.data.shard_by == ("file" if arg == "pod" else "record")
    config = config_lib.from_config_dict(raw)
    cfg = config.model

    flat = abstract_params(cfg)
    total = sum(math.prod(shape) for shape, _ in flat)
    assert total > 0

    if name not in PUBLISHED:
        return
    expected_params, published = PUBLISHED[name]
    assert total == expected_params
    hf_mappings.check_matches(cfg, published, where=f"published config of {name}")
    assert cfg.init_from.startswith("hf:") and config.job == "pretrain"
    assert (cfg.compute_dtype, cfg.scan_layers, cfg.remat) == ("bfloat16", True, "full")

    # The mesh it asks for (8 devices, or two 64-chip slices for :pod) splits the weights evenly: every device holds
    # 1 / (fsdp * tensor) of them, give or take the replicated norms.
    devices = 8 if arg is None else 128
    sizes = mesh_shape(config.mesh, devices)
    rules = Rules(AbstractMesh(tuple(sizes[a] for a in AXES), AXES), config.mesh.rules)
    per_device = 0
    for shape, axes in flat:
        spec = rules.spec(axes, shape)
        split = math.prod(
            math.prod(sizes[a] for a in (s if isinstance(s, tuple) else (s,))) for s in spec if s
        )
        per_device += math.prod(shape) / split
    assert per_device <= 1.01 * total / (sizes["fsdp"] * sizes["tensor"])
    assert config.train.batch_size // config.train.grad_accum % (sizes["data"] * sizes["fsdp"]) == 0


# Every section of the config and its dotted prefix (the pipeline's per-stage sections share StageRun).
SECTIONS = {
    "": config_lib.Config,
    **{k: t for k, t in typing.get_type_hints(config_lib.Config).items() if dataclasses.is_dataclass(t)},
    "pipeline.sft": config_lib.StageRun,
}


def numeric_keys() -> list[tuple[str, str, type]]:
    hints = {prefix: typing.get_type_hints(cls) for prefix, cls in SECTIONS.items()}
    return [
        (prefix, name, hints[prefix][name])
        for prefix, cls in SECTIONS.items()
        for name in (f.name for f in dataclasses.fields(cls))
        if hints[prefix][name] in (int, float)
    ]


def outside(spec: str, kind: type) -> list:
    """Values just outside the range `spec` (one per bound), and NaN for floats."""
    step = 1 if kind is int else 0.5
    m = re.match(r"(-1 or )?(?:(>=|>) (-?[\d.]+)|in ([\[(])(-?[\d.]+), (-?[\d.]+)([\])]))", spec)
    minus_one, op, bound, left, lo, hi, right = m.groups()
    if op:
        bound = kind(float(bound))
        values = [bound if op == ">" else bound - step]
        if minus_one:
            values = [-2, 0] if kind is int else [-2.0, 0.0]
    else:
        lo, hi = kind(float(lo)), kind(float(hi))
        values = [lo - step if left == "[" else lo, hi + step if right == "]" else hi]
    return values + ([float("nan")] if kind is float else [])


def test_every_numeric_key_has_a_range():
    listed = {(cls.__name__, key) for _, cls in SECTIONS.items() for key in RANGES.get(cls.__name__, {})}
    keys = {(SECTIONS[prefix].__name__, name) for prefix, name, _ in numeric_keys()}
    assert keys - listed == set(), "numeric config keys without a range in config_ranges.RANGES"
    assert listed - keys == set(), "RANGES lists keys that are not numeric fields"


@pytest.mark.parametrize("prefix,name,kind", numeric_keys(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_value_outside_each_numeric_range_is_one_line_naming_the_key(prefix, name, kind):
    spec = RANGES[SECTIONS[prefix].__name__][name]
    dotted = f"{prefix}.{name}" if prefix else name
    # The default is inside the range (so only the bad value can be blamed below).
    raw = config_lib.defaults()
    raw.workdir = "/tmp/unused"
    default = config_lib.from_config_dict(raw)
    for part in dotted.split("."):
        default = getattr(default, part)
    assert in_range(default, spec) or (prefix.startswith("pipeline.") and default in (0, -1))
    for bad in outside(spec, kind):
        raw = config_lib.defaults()
        raw.workdir = "/tmp/unused"
        section = raw
        for part in dotted.split(".")[:-1]:
            section = section[part]
        section[name] = bad
        with pytest.raises(config_lib.ConfigError) as e:
            config_lib.from_config_dict(raw)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{dotted}={bad!r} must be "), message
