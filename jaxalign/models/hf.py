"""Hugging Face interop: load a `config.json` + safetensors directory into the jaxalign `Transformer`, and save one
that transformers loads.

    model = hf.load("path/to/hf_dir", dtype=jnp.float32, mesh=None)
    logits_BxTxV = model(tokens_BxT)
    hf.save(model, "out_dir")

    model = hf.load("base_dir", adapter="peft_dir")     a Hugging Face PEFT LoRA adapter on top (`peft/peft_io.py`)
    hf.save_adapter(model, "adapter_dir")               the model's LoRA adapters, as PEFT writes them
    hf.save(model, "out_dir", merge_lora=True)          adapters folded into the weights (NF4 ones dequantised)

Training configs set `model.init_from="hf:/path/to/hf_dir"`; `pretrain.run` then calls `load_params(cfg, rules)`.

Loading streams: each checkpoint tensor is memory-mapped (`safetensors.safe_open`) and every device reads only its
own slice of it (`jax.make_array_from_callback` with the parameter's rule-given `NamedSharding`), so no host ever holds
a full copy of the model, and the parameters land directly in their shardings. A directory on an object store (`gs://...`, through
`jaxalign.storage`), where nothing can be memory-mapped, is read one tensor per ranged read, the latest tensors kept
(up to 1 GiB) while the devices take their slices. Pickle checkpoints (`*.bin`, `*.pt`,
`*.pth`) are refused: jaxalign never unpickles.

Saving writes shards of at most `max_shard_bytes` (5 GB like transformers; one tensor larger than that gets a shard of
its own) with `model.safetensors.index.json`, gathering one tensor (one layer of a stacked tensor) at a time. On an object
store each shard is serialized in memory (`safetensors.numpy.save`) and written in one PUT.
Config and tensor-name mappings live in `hf_mappings.py`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import storage
from jaxalign.config import DEFAULT_RULES, MeshConfig, ModelConfig
from jaxalign.errors import CheckpointError, ConfigError
from jaxalign.models.hf_mappings import (
    IGNORED_SUFFIXES,
    TensorMap,
    check_matches,
    hf_config,
    model_config,
    tensor_map,
)
from jaxalign.models.transformer import Transformer, param_shardings
from jaxalign.parallel.mesh import Rules, make_mesh

__all__ = ["load", "save", "save_adapter", "load_params", "model_config", "read_config"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "F64": np.float64}


def _dtype_name(dtype: Any) -> str:
    name = jnp.dtype(dtype).name
    if name not in _NP_DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; accepted: {sorted(_NP_DTYPES)}")
    return name


def _checkpoint_dir(init_from: str) -> str:
    """The directory of `model.init_from="hf:/path"` (a bare path is accepted too)."""
    path = init_from[3:] if init_from.startswith("hf:") else init_from
    if not path:
        raise ConfigError(f"model.init_from={init_from!r} names no directory; expected 'hf:/path/to/hf_dir'")
    return path


def read_config(path: str) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    config_path = storage.join(path, "config.json")
    if not storage.path(path).is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory {path!r} does not exist")
    if not storage.exists(config_path):
        raise CheckpointError(
            f"{config_path} does not exist: a Hugging Face checkpoint needs its config.json"
        )
    return json.loads(storage.read_text(config_path))


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index when there is one, else from every `*.safetensors`."""
    index_path = storage.join(path, INDEX_FILE)
    if storage.exists(index_path):
        weight_map = json.loads(storage.read_text(index_path))["weight_map"]
        # The index is data from the checkpoint: it may only name files inside the checkpoint directory. The check
        # is on the names (no absolute path, no `..`), not on resolved links: a Hugging Face cache snapshot's files
        # are links into its blobs directory.
        outside = sorted(
            {
                str(file)
                for file in weight_map.values()
                if not isinstance(file, str)
                or os.path.isabs(file)
                or ".." in file.replace("\\", "/").split("/")
            }
        )
        if outside:
            raise CheckpointError(
                f"{index_path} names files outside the checkpoint directory: {outside}; an index may only name "
                "files in its own directory"
            )
        missing = sorted(
            {file for file in weight_map.values() if not storage.exists(storage.join(path, file))}
        )
        if missing:
            raise CheckpointError(f"{index_path} names files that do not exist: {missing}")
        return {name: storage.join(path, file) for name, file in weight_map.items()}
    files = storage.glob(storage.join(path, "*.safetensors"))
    if not files:
        pickles = sorted(
            os.path.basename(p)
            for pattern in PICKLE_PATTERNS
            for p in storage.glob(storage.join(path, pattern))
        )
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles)}); jaxalign loads safetensors only and "
                f"never unpickles. Convert it once with transformers: "
                f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
            )
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    names: dict[str, str] = {}
    for file in files:
        names.update({name: file for name in _header(file)[0] if name != "__metadata__"})
    return names


def _header(file: str) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts (two ranged reads)."""
    with storage.open_binary(file) as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


class _ObjectTensors:
    """Tensors of safetensors files on an object store (no memory map there): each tensor is one ranged read,
    and the most recently read ones are kept up to `cache_bytes`, since every device's callback asks for its slice
    of the same tensors in turn."""

    def __init__(self, cache_bytes: int = 2**30):
        self._headers: dict[str, tuple[dict[str, Any], int]] = {}
        self._cache: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self.cache_bytes = cache_bytes

    def info(self, file: str, name: str) -> tuple[dict[str, Any], int]:
        if file not in self._headers:
            self._headers[file] = _header(file)
        header, start = self._headers[file]
        return header[name], start

    def tensor(self, file: str, name: str) -> np.ndarray:
        key = (file, name)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        info, start = self.info(file, name)
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name} has dtype {info['dtype']}; accepted: {sorted(_SAFETENSORS_DTYPES)}"
            )
        begin, end = info["data_offsets"]
        with storage.open_binary(file) as f:
            f.seek(start + begin)
            data = f.read(end - begin)
        array = np.frombuffer(data, np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])).reshape(info["shape"])
        self._cache[key] = array
        while sum(a.nbytes for a in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return array


class _Reader:
    """Memory-mapped, sliceable checkpoint tensors. Uses `safe_open(framework="numpy")`; for a dtype this
    safetensors build cannot hand to numpy (bf16 before ml_dtypes support), it maps the bytes itself."""

    def __init__(self, files: dict[str, str]):
        from safetensors import safe_open

        self.files = files
        self._stack = contextlib.ExitStack()
        self._handles = {
            f: self._stack.enter_context(safe_open(f, framework="numpy"))
            for f in set(files.values())
            if storage.is_local(f)
        }
        self._objects = _ObjectTensors()  # files on an object store
        self._memmaps: dict[str, np.ndarray] = {}

    def close(self) -> None:
        self._stack.close()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.files[name] not in self._handles:
            return tuple(self._objects.info(self.files[name], name)[0]["shape"])
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if self.files[name] not in self._handles:
            return np.asarray(self._objects.tensor(self.files[name], name)[index])
        try:
            return np.asarray(self._handles[self.files[name]].get_slice(name)[index])
        except TypeError:
            if name not in self._memmaps:
                self._memmaps[name] = _memmap(self.files[name], name)
            return np.asarray(self._memmaps[name][index])


def _memmap(file: str, name: str) -> np.ndarray:
    header, start = _header(file)
    info = header[name]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {name} has dtype {info['dtype']}; accepted: {sorted(_SAFETENSORS_DTYPES)}"
        )
    begin, _ = info["data_offsets"]
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    return np.memmap(file, dtype=dtype, mode="r", offset=start + begin, shape=tuple(info["shape"]))


def _load_state(cfg: ModelConfig, rules: Rules, path: str, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of `cfg` with every parameter read from the checkpoint at `path` into its sharding.
    Names and shapes are all checked before any weight is read."""
    create = lambda: nnx.split(Transformer(cfg, nnx.Rngs(0), rules))
    graphdef, abstract = jax.eval_shape(create)
    shardings = dict(nnx.to_flat_state(param_shardings(abstract, rules)))
    files = _weight_files(path)
    reader = _Reader(files)
    np_dtype = _NP_DTYPES[_dtype_name(dtype)]
    try:
        plan = [(key, var, tensor_map(key, cfg)) for key, var in nnx.to_flat_state(abstract)]
        for key, var, tmap in plan:
            want = var.shape[1:] if tmap.stacked else var.shape
            want = tuple(reversed(want)) if tmap.transpose else tuple(want)
            for name in tmap.names:
                if name not in files:
                    raise CheckpointError(
                        f"{path}: tensor {name} is missing (needed for {'/'.join(map(str, key))})"
                    )
                if reader.shape(name) != want:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {reader.shape(name)}, the config gives {want}"
                    )
        used = {name for _, _, tmap in plan for name in tmap.names}
        unused = sorted(
            n
            for n in set(files) - used
            if not n.endswith(IGNORED_SUFFIXES) and not (cfg.tie_embeddings and n == "lm_head.weight")
        )
        if unused:
            raise CheckpointError(
                f"{path}: tensors the model has no place for: {unused[:5]} ({len(unused)} in all)"
            )
        flat = []
        for key, var, tmap in plan:
            callback = _slice_reader(reader, tmap, np_dtype)
            array = jax.make_array_from_callback(var.shape, shardings[key].get_value(), callback)
            flat.append((key, var.replace(array)))
    finally:
        reader.close()
    return graphdef, nnx.from_flat_state(flat)


def _slice_reader(
    reader: _Reader, tmap: TensorMap, np_dtype: Any
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """The `make_array_from_callback` callback: one device's slice of the parameter, read from the memory map."""

    def read_one(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if tmap.transpose:
            return reader.read(name, tuple(reversed(index))).T
        return reader.read(name, index)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if tmap.stacked:
            layers = range(len(tmap.names))[index[0]]
            x = np.stack([read_one(tmap.names[i], index[1:]) for i in layers])
        else:
            x = read_one(tmap.names[0], index)
        return np.ascontiguousarray(x.astype(np_dtype, copy=False))

    return callback


def _rules(mesh: Mesh | None, rules: Sequence[tuple[str, Sequence[str]]] | None) -> Rules:
    if mesh is None:
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, stage=1), devices=jax.devices()[:1])
    table = tuple((name, tuple(axes)) for name, axes in (rules or DEFAULT_RULES))
    return Rules(mesh, table)


def load(
    path: str,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Sequence[tuple[str, Sequence[str]]] | None = None,
    adapter: str | None = None,
    **overrides: Any,
) -> Transformer:
    """Loads a Hugging Face checkpoint directory (config.json + *.safetensors, sharded with an index or not) as a
    `Transformer`. Parameters are stored in `dtype`, which is also the compute dtype unless `compute_dtype` is given
    in `overrides` (which set any non-architecture `ModelConfig` field, e.g. `scan_layers=True`). Without a `mesh`
    the model lives on one device; with one (from `parallel.mesh.make_mesh`), parameters are sharded by `rules`
    (default `config.DEFAULT_RULES`). `adapter` names a PEFT LoRA adapter directory applied on top (its
    adapters are float32 and sharded by their base weights' rules)."""
    overrides.setdefault("compute_dtype", _dtype_name(dtype))
    cfg = model_config(read_config(path), where=storage.join(path, "config.json"), **overrides)
    table = _rules(mesh, rules)
    graphdef, params = _load_state(cfg, table, path, dtype)
    model = nnx.merge(graphdef, params)
    if adapter is not None:
        from jaxalign.peft import peft_io

        peft_io.read_config(adapter)  # one-line errors before any work
        peft_io.apply_adapter(model, adapter)
        graphdef, params = nnx.split(model)
        model = nnx.merge(graphdef, jax.device_put(params, param_shardings(params, table)))
    return model


def save_adapter(model: Transformer, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Writes the model's LoRA adapters as a PEFT adapter directory (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the transformers base."""
    from jaxalign.peft import peft_io

    if jax.process_index() == 0:
        peft_io.save_adapter(model, out_dir, base_model_name_or_path)


def load_params(cfg: ModelConfig, rules: Rules) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, float32 params) for a training config with `model.init_from="hf:/path"`, placed directly in their
    rule-given shardings. The checkpoint's config.json must agree with `cfg` on every architecture field."""
    path = _checkpoint_dir(cfg.init_from)
    check_matches(cfg, read_config(path), where=storage.join(path, "config.json"))
    return _load_state(cfg, rules, path, jnp.float32)


def _host_value(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host numpy array."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def save(
    model: Transformer,
    out_dir: str,
    *,
    dtype: Any = None,
    model_type: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config_overrides: dict[str, Any] | None = None,
    merge_lora: bool = False,
) -> None:
    """Writes `model` as a Hugging Face checkpoint: config.json and safetensors shards (with
    `model.safetensors.index.json` when there are several). `dtype` defaults to the parameters' dtype;
    `model_type` to the family `hf_mappings.infer_model_type` picks (pass "mistral" for a Mistral);
    `config_overrides` adds config.json keys such as `bos_token_id`. Call it on every process of a multi-host run;
    process 0 writes. A model with LoRA adapters (or an NF4 base) needs `merge_lora=True`: a merged copy is saved
    (the model itself is left as it is)."""
    from jaxalign.peft import lora, nf4

    adapted = lora.adapters(model) or any(isinstance(n, nf4.Nf4Weight) for _, n in nnx.iter_graph(model))
    if adapted and not merge_lora:
        raise ConfigError(
            "hf.save: the model has LoRA adapters or NF4 weights; pass merge_lora=True to save merged weights, or "
            "use hf.save_adapter for the adapters alone"
        )
    if adapted:
        model = lora.merge(nnx.clone(model))
    cfg = model.cfg
    params = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(params))
    save_dtype = _dtype_name(dtype if dtype is not None else flat[0][1].get_value().dtype)
    np_dtype = _NP_DTYPES[save_dtype]
    config = dict(hf_config(cfg, model_type, save_dtype), **(config_overrides or {}))

    # Plan: (tensor name, how to fetch it) in checkpoint order, then shards by size.
    tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]] = []
    for key, var in flat:
        tmap = tensor_map(key, cfg)
        if key == ("lm_head",) and cfg.tie_embeddings:
            continue
        array = var.get_value()
        for i, name in enumerate(tmap.names):
            shape = array.shape[1:] if tmap.stacked else array.shape
            shape = tuple(reversed(shape)) if tmap.transpose else tuple(shape)

            def fetch(array=array, i=i, tmap=tmap):
                x = _host_value(array[i] if tmap.stacked else array)
                return np.ascontiguousarray((x.T if tmap.transpose else x).astype(np_dtype))

            tensors.append((name, shape, fetch))
    tensors.sort(key=lambda t: _natural_key(t[0]))
    itemsize = np.dtype(np_dtype).itemsize
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, _) in enumerate(tensors):
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes

    write = jax.process_index() == 0
    if write:
        storage.path(out_dir).mkdir(parents=True, exist_ok=True)
        shards_glob = storage.glob(storage.join(out_dir, "model-*-of-*.safetensors"))
        # Names relative to out_dir (glob returns them joined to it, relative when out_dir is).
        for stale in [SINGLE_FILE, INDEX_FILE, *(os.path.basename(p) for p in shards_glob)]:
            storage.path(storage.join(out_dir, stale)).unlink(missing_ok=True)
    from safetensors.numpy import save, save_file

    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {tensors[i][0]: tensors[i][2]() for i in shard}
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({name: file for name in arrays})
        if write and storage.is_local(out_dir):
            save_file(arrays, os.path.join(out_dir, file), metadata={"format": "pt"})
        elif write:  # an object store: the shard's bytes in one PUT
            storage.write_atomic(storage.join(out_dir, file), save(arrays, metadata={"format": "pt"}))
    if not write:
        return
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(storage.join(out_dir, INDEX_FILE), index)
    _write_json(storage.join(out_dir, "config.json"), config)


def _natural_key(name: str) -> list[Any]:
    """Sorts `model.layers.10` after `model.layers.9`."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _write_json(path: str, data: Any) -> None:
    storage.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
