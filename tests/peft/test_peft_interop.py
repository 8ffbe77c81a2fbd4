"""PEFT interop (`hf.load(..., adapter=)`, `hf.save_adapter`, `hf.save(merge_lora=True)`) against `peft` itself on a
tiny random transformers Llama: same logits both ways, and one-line errors for bad adapter directories."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models import hf
from jaxalign.peft import lora
from tests.models.test_hf import forward, make_hf_model, torch_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 160, size=(2, 24))


@pytest.fixture(scope="module")
def made_by_peft(tmp_path_factory, tokens):
    """(base dir, adapter dir, PEFT's logits): a random Llama and a random (b != 0) rank-4 adapter made by peft,
    on every projection except layer 1's v_proj (a stacked adapter with a missing layer)."""
    base = make_hf_model("llama", num_key_value_heads=2)
    base_dir, adapter_dir = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("adapter")
    base.save_pretrained(str(base_dir))
    base_logits = torch_logits(base, tokens)  # before peft injects its layers into `base`
    config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        target_modules=TARGETS,
        exclude_modules=["model.layers.1.self_attn.v_proj"],
        init_lora_weights=False,  # random b: the adapter changes the logits
    )
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(str(adapter_dir))
    return str(base_dir), str(adapter_dir), torch_logits(model, tokens), base_logits


@pytest.mark.parametrize("scan_layers", [True, False])
def test_peft_adapter_gives_peft_logits(made_by_peft, tokens, scan_layers):
    base_dir, adapter_dir, expected, base_logits = made_by_peft
    model = hf.load(base_dir, adapter=adapter_dir, scan_layers=scan_layers)
    logits = forward(model, tokens)
    print(f"scan_layers={scan_layers}: max |logits - peft| = {np.abs(logits - expected).max():.2e}")
    assert np.abs(expected - base_logits).max() > 0.1  # the adapter matters
    assert np.abs(logits - expected).max() <= TOL, np.abs(logits - expected).max()
    assert len(lora.adapters(model)) == (7 if scan_layers else 13)


def test_saved_adapter_loads_in_peft(made_by_peft, tokens, tmp_path):
    base_dir, adapter_dir, _, _ = made_by_peft
    model = hf.load(base_dir, adapter=adapter_dir, scan_layers=True)
    for i, adapter in enumerate(lora.adapters(model).values()):  # new adapter values: not a copy of the input
        adapter.b.set_value(0.2 * jax.random.normal(jax.random.key(i), adapter.b.shape))
    expected = forward(model, tokens)
    hf.save_adapter(model, str(tmp_path / "out"))
    base = make_hf_model("llama", num_key_value_heads=2)
    oracle = peft.PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    err = np.abs(torch_logits(oracle, tokens) - expected).max()
    print(f"saved adapter in peft: max |logits - jaxalign| = {err:.2e}")
    assert err <= TOL
    # Merged weights saved as a plain checkpoint: transformers gives the same logits.
    hf.save(model, str(tmp_path / "merged"), merge_lora=True)
    assert lora.adapters(model)  # the model itself keeps its adapters
    import transformers

    merged = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert np.abs(torch_logits(merged, tokens) - expected).max() <= TOL
    with pytest.raises(ConfigError, match="pass merge_lora=True"):
        hf.save(model, str(tmp_path / "unmerged"))


def test_bad_adapters_are_one_line_errors(made_by_peft, tmp_path):
    base_dir, adapter_dir, _, _ = made_by_peft

    def variant(name, edit_config=None, drop_weights=False, pickle=False):
        d = tmp_path / name
        shutil.copytree(adapter_dir, d)
        if edit_config:
            cfg = json.loads((d / "adapter_config.json").read_text())
            cfg.update(edit_config)
            (d / "adapter_config.json").write_text(json.dumps(cfg))
        if drop_weights or pickle:
            (d / "adapter_model.safetensors").unlink()
        if pickle:
            (d / "adapter_model.bin").write_bytes(b"not read")
        return str(d)

    cases = [
        (
            variant("pickle", pickle=True),
            r"only pickle files \['adapter_model.bin'\], which jaxalign never loads",
        ),
        (variant("dora", {"use_dora": True}), r"use_dora=True is not supported"),
        (variant("rank", {"r": 8}), r"lora_A.weight has shape \(4, 32\), the model \(r=8\) needs \(8, 32\)"),
        (variant("type", {"peft_type": "IA3"}), r"peft_type='IA3', only 'LORA' is read"),
    ]
    for directory, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            hf.load(base_dir, adapter=directory)
        assert "\n" not in str(info.value)
    # An adapter of another model shape: named tensor, both shapes.
    other = make_hf_model("llama", num_key_value_heads=2, hidden_size=48)
    other_dir = tmp_path / "other"
    peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(other_dir)
    )
    with pytest.raises(
        CheckpointError, match=r"q_proj.lora_A.weight has shape \(4, 48\), the model \(r=4\) needs"
    ):
        hf.load(base_dir, adapter=str(other_dir))
    with pytest.raises(CheckpointError, match="no LoRA adapters"):
        hf.save_adapter(hf.load(base_dir), str(tmp_path / "none"))
