"""Per-device training memory of a config on its mesh, without allocating the model: size a slice before renting it.

    python -m jaxalign.tools.memory --config=configs/llama3_8b.py
    python -m jaxalign.tools.memory --config=configs/llama3_8b.py:pod --devices=128
    python -m jaxalign.tools.memory --config=configs/pretrain.py --config.mesh.fsdp=8 --devices=8 --compile

Prints, per device, the bytes of parameters, gradients, optimizer state and activations of one train step and
their total, then one JSON line with the same figures. Parameters and optimizer state come from `jax.eval_shape`
of the real train state and the shardings the rules give it on an abstract mesh of `--devices` devices (default:
the config's mesh with any -1 axis at size 1), so they are exact. Gradients are a float32 copy of the parameters,
sharded alike. Activations are an estimate from the model shape, the per-device microbatch, the remat policy, the
compute dtype and the attention implementation (`activation_bytes`: what the backward pass keeps per layer, one
layer's recompute working set, the gathered weights of one layer, and float32 logits with their gradient).

The attention implementation is the one the model would run on the target (`--platform`, default tpu; with
`--tpu_generation` a given TPU): `models.attention.resolve` of the microbatch's abstract q and k under an abstract
mesh of the target's device, as when lowering for it. So model.attention="auto" is "xla" on cpu, "flash" on gpu,
and on TPU "flash" where the kernel fits the generation's VMEM, else "xla" (e.g. v4 at T=8192); without a generation
the fit is not checked ("flash").

`--compile` also lowers and compiles the real pretraining step for the mesh on this machine's devices (abstract
inputs, nothing allocated) and prints XLA's `memory_analysis()` of it: arguments, outputs, aliased (donated) and
temporary bytes per device. XLA:CPU plans buffers differently from TPU/GPU compilers, so use it to check the
estimate on small models, not to size an accelerator.

Legend: B rows, D d_model, H / K query / key-value heads, Dh head dim, F MLP width,
V vocabulary, L layers, T sequence length, c bytes of the compute dtype, tp tensor-parallel size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from jaxalign import config as config_lib
from jaxalign.config import Config, ModelConfig
from jaxalign.errors import ConfigError, UserError
from jaxalign.kernels import vmem
from jaxalign.main import _CONFIG, _parse_flags
from jaxalign.models import attention as attention_lib
from jaxalign.models.transformer import Transformer
from jaxalign.parallel.mesh import AXES, Rules, mesh_shape
from jaxalign.train import state as state_lib

_DEVICES = flags.DEFINE_integer(
    "devices", None, "devices of the mesh (default: the config's, -1 axes at size 1)"
)
_COMPILE = flags.DEFINE_bool("compile", False, "also compile the pretraining step on this machine's devices")
_PLATFORM = flags.DEFINE_enum(
    "platform",
    None,
    ["cpu", "gpu", "tpu"],
    "target platform for attention='auto' (default: tpu; cpu with --compile)",
)
_TPU_GENERATION = flags.DEFINE_enum(
    "tpu_generation",
    None,
    list(vmem.VMEM_CAPACITY_BYTES),
    "target TPU generation (implies --platform=tpu): attention='auto' uses XLA where flash does not fit its VMEM",
)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _human(num_bytes: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if num_bytes >= size:
            return f"{num_bytes / size:10.3f} {unit}"
    return f"{num_bytes:10d} B "


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device of one training step's state and activations on `mesh`, with the attention implementation
    ("xla" or "flash") the activations assume."""

    mesh: dict[str, int]
    params: int
    grads: int
    opt_state: int
    activations: int
    num_params: int
    attention: str

    @property
    def total(self) -> int:
        return self.params + self.grads + self.opt_state + self.activations


def default_devices(config: Config) -> int:
    """The config's mesh size with any -1 axis at size 1 (one slice of a `data=-1` pod config)."""
    return math.prod(max(getattr(config.mesh, a), 1) for a in AXES)


def target_device(platform: str, generation: str | None = None) -> AbstractDevice:
    """The abstract device of the target `platform` ("cpu", "gpu" or "tpu"), of TPU `generation` (a key of
    `vmem.VMEM_CAPACITY_BYTES`) when given: what an abstract mesh carries when lowering for that platform."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ConfigError(f"platform={platform!r} is not one of ['cpu', 'gpu', 'tpu']")
    if generation is None:
        # A device kind vmem.DEVICE_KINDS does not list: the flash kernel's VMEM fit is not checked.
        kind = {"cpu": "cpu", "gpu": "cuda", "tpu": "TPU"}[platform]
        return AbstractDevice(
            device_kind=kind, num_cores=1, platform="cuda" if platform == "gpu" else platform
        )
    if platform != "tpu" or generation not in vmem.VMEM_CAPACITY_BYTES:
        raise ConfigError(
            f"tpu_generation={generation!r} (platform={platform!r}) needs platform 'tpu' and one of "
            f"{list(vmem.VMEM_CAPACITY_BYTES)}"
        )
    kind = next(k for k, g in vmem.DEVICE_KINDS.items() if g == generation)
    return AbstractDevice(device_kind=kind, num_cores=1, platform="tpu")


def abstract_mesh(config: Config, num_devices: int, device: AbstractDevice | None = None) -> AbstractMesh:
    """The config's mesh over `num_devices` abstract devices (of `device`'s platform and kind when given)."""
    sizes = mesh_shape(config.mesh, num_devices)
    return AbstractMesh(
        tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), abstract_device=device
    )


def abstract_state(config: Config, rules: Rules) -> tuple[Any, Any]:
    """(abstract TrainState, its shardings) exactly as `state_lib.create_sharded` would build them."""
    graphdef, params = jax.eval_shape(
        lambda: nnx.split(Transformer(config.model, nnx.Rngs(config.seed), rules))
    )
    state = jax.eval_shape(
        lambda p: state_lib.create(
            graphdef, p, config.optim, config.train.steps, config.seed, config.train.ema_decay
        ),
        params,
    )
    return state, state_lib.state_shardings(state, rules)


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Sum over leaves of the bytes of one device's shard."""
    sizes = jax.tree.map(
        lambda a, s: math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize, tree, shardings
    )
    return int(sum(jax.tree.leaves(sizes)))


def train_attention(config: Config, rows: int, mesh: AbstractMesh) -> str:
    """The attention implementation the model's training forward runs for `model.attention` on `mesh`'s device:
    `attention.resolve` of abstract q (rows, T, H, Dh) and k (rows, T, K, Dh) in the compute dtype, with segment
    ids (training batches carry them), under `mesh` as when lowering for its platform."""
    cfg, T = config.model, config.train.seq_len
    dtype = jnp.dtype(cfg.compute_dtype)
    q_BxTxHxDh = jax.ShapeDtypeStruct((rows, T, cfg.n_heads, cfg.head_dim), dtype)
    k_BxTxKxDh = jax.ShapeDtypeStruct((rows, T, cfg.n_kv_heads, cfg.head_dim), dtype)
    with jax.sharding.use_abstract_mesh(mesh):
        return attention_lib.resolve(cfg.attention, q_BxTxHxDh, k_BxTxKxDh, segments=True)


def activation_bytes(
    cfg: ModelConfig, rows: int, seq_len: int, tp: int, attention: str, logits_chunk: int = 0
) -> int:
    """Estimated activation bytes per device of one microbatch (`rows` sequences of `seq_len` on this device)
    through forward + backward.

    Per token and layer the backward keeps (remat "none"): the block input, both norm outputs and the residual
    after attention (4 D), q, k, v and the attention output ((2H + 2K) Dh / tp), gate, up and their product
    (3 F / tp), all in the compute dtype, plus for XLA attention the softmax probabilities (H T / tp, float32 and
    a compute-dtype copy) or for flash attention the log-sum-exp (H / tp, float32). "dots" keeps only matmul
    outputs (2 D + (H + 2K) Dh / tp + 2 F / tp) and "full" only the block input (D); both then recompute one
    layer at a time, so one layer's "none" set is added once. Also counted: the final hidden states (D), the
    gathered weights of one layer in the compute dtype, and the float32 logits with their gradient
    (2 x 4 V / tp per token, for `rows x logits_chunk` tokens at a time when `train.logits_chunk` is set).
    """
    c = _DTYPE_BYTES[cfg.compute_dtype]
    D, H, K, Dh, F, V, L = (
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_ff,
        cfg.vocab_size,
        cfg.n_layers,
    )
    if attention == "xla":
        attn = H * seq_len * (4 + c) / tp
    else:
        attn = H * 4 / tp
    full_layer = c * (4 * D + (2 * H + 2 * K) * Dh / tp + 3 * F / tp) + attn
    saved = {
        "none": full_layer,
        "dots": c * (2 * D + (H + 2 * K) * Dh / tp + 2 * F / tp),
        "full": c * D,
    }[cfg.remat]
    per_token = L * saved + (full_layer if cfg.remat != "none" else 0.0) + c * D
    layer_weights = (D * (H + 2 * K) * Dh + H * Dh * D + 3 * D * F) / tp * c
    logit_tokens = rows * (logits_chunk if 0 < logits_chunk < seq_len else seq_len)
    logits = logit_tokens * 2 * 4 * V / tp
    return int(rows * seq_len * per_token + logits + layer_weights)


def estimate(
    config: Config, num_devices: int | None = None, platform: str = "tpu", generation: str | None = None
) -> Estimate:
    """Per-device bytes of a config's train step on a mesh of `num_devices` (default: `default_devices`) of the
    target `platform` (TPU `generation` when given; see `target_device`)."""
    num_devices = num_devices or default_devices(config)
    mesh = abstract_mesh(config, num_devices, target_device(platform, generation))
    rules = Rules(mesh, config.mesh.rules)
    state, shardings = abstract_state(config, rules)
    params = per_device_bytes(state.params, shardings.params)
    # The rest of the state (optimizer moments and count, step, RNG key, update guard).
    rest = per_device_bytes(state, shardings) - params
    tcfg = config.train
    micro = tcfg.batch_size // tcfg.grad_accum
    rows = math.ceil(micro / rules.data_parallel_size)
    attention = train_attention(config, rows, mesh)
    acts = activation_bytes(
        config.model, rows, tcfg.seq_len, mesh.shape["tensor"], attention, tcfg.logits_chunk
    )
    return Estimate(
        mesh=dict(mesh.shape),
        params=params,
        grads=params,  # same shapes, dtypes and shardings as the parameters
        opt_state=rest,
        activations=acts,
        num_params=sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)),
        attention=attention,
    )


def abstract_step_inputs(
    config: Config, rules: Rules
) -> tuple[Any, dict[str, jax.ShapeDtypeStruct], Any, Any]:
    """The pretraining step's inputs on `rules`' mesh, abstract (nothing is allocated): (train state and batch as
    ShapeDtypeStructs carrying their shardings, the state's shardings, the batch's sharding). The batch holds
    `pretrain.BATCH_KEYS`, each (train.batch_size, train.seq_len): float32 weights, the rest int32."""
    # The tool is an entry point like main, so it may use the stage's batch layout.
    from jaxalign.stages import pretrain

    state, shardings = abstract_state(config, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    batch_sharding = rules.sharding(("batch", "length"))
    shape_BxT = (config.train.batch_size, config.train.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(
            shape_BxT, np.float32 if k == "weights" else np.int32, sharding=batch_sharding
        )
        for k in pretrain.BATCH_KEYS
    }
    return state, batch, shardings, batch_sharding


def compiled_memory(config: Config, devices: list[jax.Device] | None = None) -> dict[str, int]:
    """XLA's memory analysis (bytes per device) of the pretraining step compiled for the config's mesh over
    `devices` (default: all), from abstract inputs: nothing is allocated."""
    if config.job != "pretrain":
        raise ConfigError(f"--compile supports job='pretrain' only, got job={config.job!r}")
    # The tool is an entry point like main, so it may use the stage's step.
    from jaxalign.stages import common, pretrain

    rules = Rules.from_config(config, devices)
    common.check_batch(config, rules)
    state, batch, shardings, batch_sharding = abstract_step_inputs(config, rules)
    step = jax.jit(
        lambda s, b: pretrain.train_step(
            s,
            b,
            optim=config.optim,
            z_loss=config.train.z_loss,
            microbatches=config.train.grad_accum,
            logits_chunk=config.train.logits_chunk,
        ),
        in_shardings=(shardings, {k: batch_sharding for k in batch}),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    analysis = step.lower(state, batch).compile().memory_analysis()
    out = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def report(
    config: Config, num_devices: int | None, platform: str, compile_step: bool, generation: str | None = None
) -> dict[str, Any]:
    """Prints the table and the JSON line; returns the JSON record."""
    est = estimate(config, num_devices, platform, generation)
    n = math.prod(est.mesh.values())
    mesh = " ".join(f"{a}={s}" for a, s in est.mesh.items())
    count = f"{est.num_params / 1e9:.2f}B" if est.num_params >= 1e8 else f"{est.num_params / 1e6:.2f}M"
    target = f"tpu {generation}" if generation else platform
    print(f"{config.job}: {count} parameters on {n} devices ({mesh}), {est.attention} attention on {target};")
    print("per device:")
    rows = [
        ("parameters", est.params),
        ("gradients", est.grads),
        ("optimizer state", est.opt_state),
        (f"activations (estimate, remat={config.model.remat})", est.activations),
        ("total", est.total),
    ]
    for name, value in rows:
        print(f"  {name:<40} {_human(value)}")
    record = {
        "devices": n,
        "mesh": est.mesh,
        "num_params": est.num_params,
        "params": est.params,
        "grads": est.grads,
        "opt_state": est.opt_state,
        "activations": est.activations,
        "total": est.total,
        "attention": est.attention,
    }
    if compile_step:
        devices = jax.devices()
        if len(devices) < n:
            raise ConfigError(f"--compile needs {n} devices for this mesh; this machine has {len(devices)}")
        measured = compiled_memory(config, devices[:n])
        print("compiled step (XLA memory_analysis, this machine):")
        for key, value in measured.items():
            print(f"  {key:<40} {_human(value)}")
        record["compiled"] = measured
    print(json.dumps(record))
    return record


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    generation = _TPU_GENERATION.value
    platform = _PLATFORM.value or ("cpu" if _COMPILE.value and not generation else "tpu")
    config_dict = _CONFIG.value
    # Nothing is written or read: a workdir and a corpus are not needed to size a run.
    config_dict.workdir = config_dict.workdir or "(unused)"
    if "data" in config_dict and config_dict.data.input is None:  # the big-model jobs leave it to the user
        config_dict.data.input = "(unused)"
    try:
        report(config_lib.from_config_dict(config_dict), _DEVICES.value, platform, _COMPILE.value, generation)
    except UserError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
