"""Hugging Face interop against transformers (CPU, float32, eager attention) as the oracle.

Tiny random checkpoints of every family, with every parameter (norms and biases too) drawn at random so a mapping
mistake anywhere moves the logits. Parity is max |logits - transformers| <= 1e-4 in float32; never loosen it.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxalign.config import DEFAULT_RULES, MeshConfig
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models import hf, hf_mappings
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.parallel.mesh import Rules, make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 160
LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

# name -> (family, config overrides): GQA ratios 1, 2, 4; tied and untied; head_dim != d_model / n_heads; RoPE scaling.
CASES = {
    "llama_gqa2_llama3": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3, rope_theta=50000.0)),
    "llama_mha_tied_headdim": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=16)),
    "mistral_mqa": ("mistral", dict(num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=1e6)),
    "qwen2_gqa2_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_mha_untied": ("qwen2", dict(num_key_value_heads=4)),
    "qwen3_gqa2": ("qwen3", dict(num_key_value_heads=2, head_dim=16)),
    "qwen3_mqa_tied": ("qwen3", dict(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True)),
    "gemma_mha": ("gemma", dict(num_key_value_heads=4, head_dim=16)),
    "gemma_mqa": ("gemma", dict(num_key_value_heads=1, head_dim=8)),
}
CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls = (getattr(transformers, name) for name in CLASSES[family])
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    config = config_cls(**{**kwargs, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def forward(model, tokens: np.ndarray) -> np.ndarray:
    """`model(tokens)` under one jit: the eager call compiles every op separately (~10 s for the first model)."""
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens)))


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokens):
    """name -> (directory, transformers logits), built once."""
    out = {}
    for name, (family, overrides) in CASES.items():
        model = make_hf_model(family, **overrides)
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (path, torch_logits(model, tokens))
    return out


def flat_params(model) -> dict:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# Every family runs both with scan_layers off and on (over its cases), Mistral twice.
PARITY = [(name, i % 2 == 1) for i, name in enumerate(CASES)] + [("mistral_mqa", True)]


@pytest.mark.parametrize(
    "name,scan_layers", PARITY, ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in PARITY]
)
def test_logits_match_transformers(checkpoints, tokens, name, scan_layers):
    path, expected = checkpoints[name]
    model = hf.load(path, dtype=jnp.float32, scan_layers=scan_layers)
    logits = forward(model, tokens)
    err = np.abs(logits - expected).max()
    print(
        f"{name} scan_layers={scan_layers}: max |logits - transformers| = {err:.2e} (|logits| <= {np.abs(expected).max():.1f})"
    )
    assert logits.shape == expected.shape
    assert err <= TOL


def test_public_contract_eager_forward(checkpoints, tokens):
    """The documented use: `hf.load(dir)` then a plain (eager) `model(tokens)` (scanned: fewer eager compiles)."""
    path, expected = checkpoints["gemma_mqa"]
    model = hf.load(path, dtype=jnp.float32, mesh=None, scan_layers=True)
    assert type(model).__name__ == "Transformer" and model.cfg.compute_dtype == "float32"
    logits_BxTxV = model(jnp.asarray(tokens))
    assert np.abs(np.asarray(logits_BxTxV) - expected).max() <= TOL


def test_llama3_rope_scaling_is_exercised(checkpoints, tokens, tmp_path):
    """The same weights without the llama3 scaling give clearly different logits, so the parity test above
    checks the scaled frequencies."""
    path, expected = checkpoints["llama_gqa2_llama3"]
    assert hf.load(path).cfg.rope_scaling == "llama3"
    config = hf.read_config(path)
    config["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": config["rope_parameters"]["rope_theta"],
    }
    json.dump(config, open(tmp_path / "config.json", "w"))
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model.safetensors")
    plain = hf.load(str(tmp_path))
    assert plain.cfg.rope_scaling == "" and plain.cfg.rope_theta == 50000.0
    assert np.abs(forward(plain, tokens) - expected).max() > 1e-2


@pytest.mark.parametrize(
    "name", ["llama_gqa2_llama3", "mistral_mqa", "qwen2_gqa2_tied", "qwen3_gqa2", "gemma_mha"]
)
def test_save_round_trip(checkpoints, tokens, tmp_path, name):
    """hf.save output, in several shards, loads in transformers with identical weights and logits, and back into
    jaxalign bitwise unchanged."""
    path, expected = checkpoints[name]
    family = CASES[name][0]
    model = hf.load(path, scan_layers=name.startswith("qwen"))
    out = str(tmp_path / "out")
    hf.save(model, out, model_type=family, max_shard_bytes=20_000)

    index = json.load(open(os.path.join(out, hf.INDEX_FILE)))
    files = set(index["weight_map"].values())
    assert len(files) > 1
    for file in files:
        header, _ = hf._header(os.path.join(out, file))
        header.pop("__metadata__", None)
        sizes = [info["data_offsets"][1] - info["data_offsets"][0] for info in header.values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1, (file, sizes)
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(os.path.join(out, f)) - hf._header(os.path.join(out, f))[1] for f in files
    )
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == family and config["architectures"] == [CLASSES[family][1]]

    reloaded_hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    original_hf = make_hf_model(family, **CASES[name][1])
    original_state = original_hf.state_dict()
    for key, value in reloaded_hf.state_dict().items():
        assert torch.equal(value, original_state[key]), key
    np.testing.assert_array_equal(torch_logits(reloaded_hf, tokens), expected)

    again = hf.load(out, scan_layers=name.startswith("qwen"))
    before, after = flat_params(model), flat_params(again)
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype
        np.testing.assert_array_equal(before[key], after[key], err_msg=str(key))


def test_mistral_saves_as_llama_by_default(checkpoints, tokens, tmp_path):
    path, expected = checkpoints["mistral_mqa"]
    hf.save(hf.load(path), str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "llama"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager"
    )
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), expected)


def test_bfloat16_checkpoint(tmp_path, tokens):
    """bf16 safetensors load exactly (bf16 -> f32 is exact) and save back as bf16 bitwise."""
    model = make_hf_model("qwen2", num_key_value_heads=2).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "bf16"))
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}

    loaded = hf.load(str(tmp_path / "bf16"), dtype=jnp.float32)
    wq = flat_params(loaded)[("blocks", 0, "attn", "wq")]
    np.testing.assert_array_equal(wq, state["model.layers.0.self_attn.q_proj.weight"].T)

    loaded_bf16 = hf.load(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
    assert loaded_bf16.cfg.compute_dtype == "bfloat16"
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(loaded_bf16).values())
    assert np.isfinite(forward(loaded_bf16, tokens).astype(np.float32)).all()
    hf.save(loaded_bf16, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="numpy") as f:
        saved = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert saved.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(saved.astype(np.float32), state["model.layers.1.mlp.down_proj.weight"])

    # The memory-map fallback (for safetensors builds without numpy bf16) reads the same values.
    file = str(tmp_path / "bf16" / "model.safetensors")
    mm = hf._memmap(file, "model.layers.1.mlp.down_proj.weight")
    np.testing.assert_array_equal(
        np.asarray(mm[3:7, 10:20], np.float32), state["model.layers.1.mlp.down_proj.weight"][3:7, 10:20]
    )


def mesh_rules(**sizes) -> Rules:
    return Rules(make_mesh(MeshConfig(**sizes)), DEFAULT_RULES)


def test_sharded_checkpoint_on_mesh(checkpoints, tokens, tmp_path):
    """A several-file checkpoint loads onto fsdp=4 x tensor=2 with the rule-given shardings and the same logits."""
    path, expected = checkpoints["qwen3_gqa2"]
    single = hf.load(path)
    sharded_dir = str(tmp_path / "sharded")
    hf.save(single, sharded_dir, max_shard_bytes=30_000)
    assert len(set(json.load(open(os.path.join(sharded_dir, hf.INDEX_FILE)))["weight_map"].values())) > 2

    rules = mesh_rules(data=1, fsdp=4, tensor=2)
    for scan_layers in (False, True):
        model = hf.load(sharded_dir, mesh=rules.mesh, scan_layers=scan_layers)
        for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            array = var.get_value()
            want = rules.sharding(var.get_metadata()["axes"], array.shape)
            assert array.sharding.is_equivalent_to(want, array.ndim), (key, array.sharding, want)
        wq = nnx.state(model, nnx.Param)["blocks"]["attn"]["wq"] if scan_layers else model.blocks[0].attn.wq
        assert len({str(s.index) for s in wq.get_value().addressable_shards}) == 8  # really split 4 x 2 ways
        logits = forward(model, tokens)
        assert np.abs(logits - expected).max() <= TOL

    # Saving gathers the sharded (and stacked) parameters back into the same tensors, bitwise.
    resaved = str(tmp_path / "resaved")
    hf.save(model, resaved, max_shard_bytes=30_000)
    from safetensors.numpy import load_file

    def tensors(directory):
        files = set(json.load(open(os.path.join(directory, hf.INDEX_FILE)))["weight_map"].values())
        return {k: v for f in files for k, v in load_file(os.path.join(directory, f)).items()}

    before, after = tensors(sharded_dir), tensors(resaved)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_load_params_for_training(checkpoints, tokens):
    """`model.init_from="hf:..."`: float32 params with init_model's graphdef, in the shardings init_model gives."""
    path, expected = checkpoints["llama_gqa2_llama3"]
    hf_config = hf.read_config(path)
    cfg = hf.model_config(hf_config, scan_layers=True, init_from=f"hf:{path}")
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.rope_scaling, cfg.rope_theta) == (2, 8, "llama3", 50000.0)
    rules = mesh_rules(data=2, fsdp=2, tensor=2)
    graphdef, params = hf.load_params(cfg, rules)
    # What init_model(cfg, rules, seed) builds, without running its jitted init.
    init_graphdef, abstract = jax.eval_shape(lambda: nnx.split(Transformer(cfg, nnx.Rngs(0), rules)))
    assert graphdef == init_graphdef
    shardings = param_shardings(abstract, rules)
    assert jax.tree.structure(params) == jax.tree.structure(shardings)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert got.dtype == jnp.float32
        assert got.sharding.is_equivalent_to(want, got.ndim)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, jnp.asarray(tokens))
    assert np.abs(np.asarray(logits) - expected).max() <= TOL


@pytest.mark.parametrize(
    "field,value,hf_key",
    [
        ("n_kv_heads", 4, "num_key_value_heads"),
        ("d_ff", 128, "intermediate_size"),
        ("rope_theta", 10000.0, "rope_theta"),
        ("tie_embeddings", True, "tie_word_embeddings"),
        ("rope_factor", 4.0, "rope_scaling.factor"),
    ],
)
def test_load_params_rejects_mismatched_config(checkpoints, field, value, hf_key):
    path, _ = checkpoints["llama_gqa2_llama3"]
    cfg = hf.model_config(hf.read_config(path), init_from=f"hf:{path}")
    with pytest.raises(ConfigError, match=rf"model\.{field}=.*{hf_key}"):
        hf.load_params(dataclasses.replace(cfg, **{field: value}), mesh_rules(fsdp=-1))


def test_pickle_only_directory_is_refused(tmp_path):
    make_hf_model("llama").config.to_json_file(str(tmp_path / "config.json"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle, and never unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        hf.load(str(tmp_path))


def test_config_errors(checkpoints):
    path, _ = checkpoints["llama_gqa2_llama3"]
    config = hf.read_config(path)
    with pytest.raises(ConfigError, match="model_type='phi'"):
        hf.model_config({**config, "model_type": "phi"})
    with pytest.raises(ConfigError, match="rope_type='yarn'"):
        hf.model_config(
            {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "rope_parameters": None}
        )
    with pytest.raises(ConfigError, match="attention_bias"):
        hf.model_config({**config, "attention_bias": True})
    with pytest.raises(ConfigError, match="model.n_layers comes from the checkpoint"):
        hf.model_config(config, n_layers=3)
    with pytest.raises(ConfigError, match="cannot be saved as model_type='llama'"):
        hf_mappings.hf_config(hf.model_config({**config, "model_type": "qwen3"}), "llama")
    # A Mistral sliding window caps max_seq_len: full attention equals windowed attention only up to the window.
    mistral_v01 = {**config, "model_type": "mistral", "sliding_window": 64}
    assert hf.model_config(mistral_v01).max_seq_len == 64
    assert hf.model_config(mistral_v01, max_seq_len=32).max_seq_len == 32
    with pytest.raises(ConfigError, match="max_seq_len=100 exceeds the checkpoint's sliding_window=64"):
        hf.model_config(mistral_v01, max_seq_len=100)
    assert hf.model_config({**config, "model_type": "mistral", "sliding_window": None}).max_seq_len == 128


def test_missing_tensor_is_named(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _ = checkpoints["qwen2_mha_untied"]
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    json.dump(hf.read_config(path), open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias is missing"):
        hf.load(str(tmp_path))


def test_gemma_hidden_activation_is_honoured(checkpoints, tokens, tmp_path):
    """The published Gemma config form (legacy hidden_act="gelu" plus hidden_activation="gelu_pytorch_tanh") computes
    what transformers computes; a hidden_activation jaxalign does not implement is refused, never replaced."""
    path, expected = checkpoints["gemma_mha"]
    config = hf.read_config(path)
    for name in os.listdir(path):
        if name != "config.json":
            os.symlink(os.path.join(path, name), tmp_path / name)
    published = dict(config, hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")
    json.dump(published, open(tmp_path / "config.json", "w"))
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager"
    )
    np.testing.assert_allclose(torch_logits(oracle, tokens), expected, atol=1e-6)  # the form changes nothing
    model = hf.load(str(tmp_path), dtype=jnp.float32)
    assert model.cfg.activation == "gelu_tanh"
    assert np.abs(forward(model, tokens) - torch_logits(oracle, tokens)).max() <= TOL

    for bad in ("gelu", "relu"):
        json.dump(dict(config, hidden_activation=bad), open(tmp_path / "config.json", "w"))
        with pytest.raises(ConfigError, match=f"hidden_activation='{bad}' is not supported for gemma"):
            hf.load(str(tmp_path))
    # Exported Gemma configs name the activation in both keys.
    hf.save(model, str(tmp_path / "out"))
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["hidden_act"] == saved["hidden_activation"] == "gelu_pytorch_tanh"


def test_save_to_a_relative_directory_removes_stale_shards(checkpoints, tmp_path, monkeypatch):
    path, _ = checkpoints["qwen2_gqa2_tied"]
    model = hf.load(path)
    monkeypatch.chdir(tmp_path)
    hf.save(model, "out", max_shard_bytes=20_000)
    shards = sorted(f for f in os.listdir("out") if f.startswith("model-"))
    assert len(shards) > 1 and os.path.exists(os.path.join("out", hf.INDEX_FILE))
    hf.save(model, "out")  # one file now: the shards and their index must go
    assert sorted(f for f in os.listdir("out") if f.endswith((".safetensors", ".json"))) == [
        "config.json",
        "model.safetensors",
    ]
    again = hf.load("out")
    for key, value in flat_params(model).items():
        np.testing.assert_array_equal(value, flat_params(again)[key])


@pytest.mark.parametrize(
    "bad", ["../model-00001-of-00002.safetensors", "/tmp/model.safetensors", "a/../../b"]
)
def test_index_naming_a_file_outside_the_checkpoint_is_refused(checkpoints, tmp_path, bad):
    path, _ = checkpoints["qwen2_mha_untied"]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    json.dump(hf.read_config(path), open(checkpoint / "config.json", "w"))
    # The named file exists (outside the checkpoint): only the name is refused.
    os.symlink(os.path.join(path, "model.safetensors"), tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": bad}}
    json.dump(index, open(checkpoint / hf.INDEX_FILE, "w"))
    with pytest.raises(CheckpointError, match="names files outside the checkpoint directory"):
        hf.load(str(checkpoint))
