"""Hugging Face PEFT LoRA adapters: read one onto a loaded `Transformer`, write one that `peft` loads.

A PEFT LoRA adapter directory holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors` with, per adapted linear layer `<module>` of the transformers model,
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r): the layout of `lora.Lora`'s a and
b, so no tensor is transposed. `<module>` is the weight's transformers name without ".weight"
(`models/hf_mappings.tensor_map`); a stacked (scanned) adapter is one tensor per layer. Pickle adapter files
(`adapter_model.bin`) are refused; options jaxalign does not implement (DoRA, bias training, embedding adapters,
per-module ranks) are one-line errors rather than silently different outputs.

Used through `models/hf.py`: `hf.load(base_dir, adapter=peft_dir)` and `hf.save_adapter(model, out_dir)`.
"""

from __future__ import annotations

import json
import math
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import storage
from jaxalign.config import LoraConfig
from jaxalign.errors import CheckpointError
from jaxalign.models.hf_mappings import tensor_map
from jaxalign.peft import lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_UNSUPPORTED = {
    "use_dora": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "fan_in_fan_out": False,
}


def _module_names(path: tuple, cfg) -> list[str]:
    """transformers module name(s) (one per layer when stacked) of the weight at `path`."""
    return [name[: -len(".weight")] for name in tensor_map(path, cfg).names]


def read_config(adapter_dir: str) -> dict:
    directory = storage.path(adapter_dir)
    config_path = directory / CONFIG_FILE
    if not (directory / WEIGHTS_FILE).exists():
        pickles = [p.name for p in directory.glob("*.bin")] if directory.is_dir() else []
        what = f"only pickle files {pickles}, which jaxalign never loads" if pickles else "no such file"
        raise CheckpointError(
            f"adapter {directory / WEIGHTS_FILE}: {what}; save the adapter with safetensors"
        )
    if not config_path.exists():
        raise CheckpointError(f"adapter {config_path}: missing (a PEFT adapter directory holds it)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"adapter {config_path}: peft_type={config.get('peft_type')!r}, only 'LORA' is read"
        )
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise CheckpointError(
                f"adapter {config_path}: {key}={config[key]!r} is not supported (accepted: {default!r})"
            )
    return config


def apply_adapter(model: nnx.Module, adapter_dir: str) -> nnx.Module:
    """Adds the PEFT adapter in `adapter_dir` to `model` (a plain `Transformer`) in place and returns it."""
    from safetensors.numpy import load

    config = read_config(adapter_dir)
    file = storage.join(adapter_dir, WEIGHTS_FILE)
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):  # scale alpha / sqrt(r), written as our alpha / r
        alpha = alpha * math.sqrt(rank)
    cfg = model.cfg
    tensors = load(storage.read_bytes(file))  # adapters are small: one read, also from an object store
    modules = {k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    # Which jaxalign weights (by path) carry an adapter, and their per-layer module names.
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[-1] in lora.PROJECTIONS]
    names = {"/".join(map(str, p)): (_module_names(p, cfg), v) for p, v in flat}
    chosen = [p for p, (mods, _) in names.items() if modules & set(mods)]
    used = {m for p in chosen for m in names[p][0]}
    if unknown := sorted(set(k for k in tensors if k[len(PREFIX) :].rsplit(".lora_", 1)[0] not in used)):
        raise CheckpointError(
            f"adapter {file}: tensors {unknown[:4]} name no LoRA-adaptable linear layer of the model"
        )
    if not chosen:
        raise CheckpointError(f"adapter {file}: holds no lora_A/lora_B tensors")
    targets = "^(" + "|".join(re.escape(p) for p in chosen) + ")$"
    lora.add_adapters(model, LoraConfig(rank=rank, alpha=alpha, dropout=0.0, targets=targets), seed=0)
    adapters = lora.adapters(model)
    for p in chosen:
        mods, var = names[p]
        n_in, n_out = var.shape[-2:]
        a_parts, b_parts = [], []
        for m in mods:
            a = tensors.get(f"{PREFIX}{m}.lora_A.weight", np.zeros((rank, n_in), np.float32))
            b = tensors.get(f"{PREFIX}{m}.lora_B.weight", np.zeros((n_out, rank), np.float32))
            for what, x, shape in (("lora_A", a, (rank, n_in)), ("lora_B", b, (n_out, rank))):
                if tuple(x.shape) != shape:
                    raise CheckpointError(
                        f"adapter {file}: {PREFIX}{m}.{what}.weight has shape {tuple(x.shape)}, the model "
                        f"(r={rank}) needs {shape}"
                    )
            a_parts.append(a.astype(np.float32))
            b_parts.append(b.astype(np.float32))
        stacked = var.ndim == 3
        adapter = adapters[p]
        adapter.a.set_value(jnp.asarray(np.stack(a_parts) if stacked else a_parts[0]))
        adapter.b.set_value(jnp.asarray(np.stack(b_parts) if stacked else b_parts[0]))
    return model


def save_adapter(model: nnx.Module, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Writes `model`'s adapters as a PEFT LoRA adapter directory (module doc) that `peft.PeftModel` loads."""
    from safetensors.numpy import save

    adapters = lora.adapters(model)
    if not adapters:
        raise CheckpointError("save_adapter: the model has no LoRA adapters")
    cfg = model.cfg
    tensors: dict[str, np.ndarray] = {}
    ranks, scales, dropouts = set(), set(), set()
    for p, adapter in adapters.items():
        path = tuple(int(k) if k.isdigit() else k for k in p.split("/"))
        a, b = np.asarray(adapter.a[...], np.float32), np.asarray(adapter.b[...], np.float32)
        ranks.add(a.shape[-2])
        scales.add(adapter.scale)
        dropouts.add(adapter.dropout)
        mods = _module_names(path, cfg)
        for i, m in enumerate(mods):
            tensors[f"{PREFIX}{m}.lora_A.weight"] = np.ascontiguousarray(a[i] if a.ndim == 3 else a)
            tensors[f"{PREFIX}{m}.lora_B.weight"] = np.ascontiguousarray(b[i] if b.ndim == 3 else b)
    if len(ranks) != 1 or len(scales) != 1:
        raise CheckpointError(
            f"save_adapter: adapters have ranks {sorted(ranks)} and scales {sorted(scales)}; PEFT "
            "writes one r and lora_alpha"
        )
    (rank,), (scale,) = ranks, scales
    modules = sorted(
        {k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": max(dropouts),
        "target_modules": modules,  # full module names: PEFT matches them exactly
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    storage.path(out_dir).mkdir(parents=True, exist_ok=True)
    storage.write_atomic(storage.join(out_dir, WEIGHTS_FILE), save(tensors, metadata={"format": "pt"}))
    storage.write_atomic(
        storage.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
