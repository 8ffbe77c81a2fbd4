"""Pipeline parallelism over the `stage` mesh axis: the GPipe and circular (interleaved) schedules, in SPMD JAX.

Turned on by `--config.mesh.stage=N` (N > 1) on any job: the layer stack is stacked (whatever `model.scan_layers`
says) and its leading `layers` dimension is split over `stage` by the rule ("layers", ("stage",)), so device s holds
layers [s L/S, (s+1) L/S) at rest (and in checkpoints, which are the same (L, ...) arrays on any mesh: a checkpoint
saved with stage=2 restores with stage=1 or fsdp=8). `Transformer.hidden` then runs its layers through `run_layers`
instead of the plain scan. The keys are `pipeline.schedule`, `pipeline.microbatches`, `pipeline.repeats`.

Shape legend: S stages (mesh.stage), R repeats (virtual stages per device), M microbatches, L layers, Lv = L / (S R)
layers per virtual stage, B rows, b = B / M rows per microbatch, T length, D d_model, N = B T, n = b T.

## Mechanism: the SPMD rotation (MaxText's), not `shard_map` + `ppermute`
Each iteration applies every stage at once: one `jax.vmap(..., spmd_axis_name="stage")` of the per-stage layer scan
over a state of shape (S, n, D) whose leading dimension is sharded over `stage`, so device s runs stage s on its
own microbatch. The state then moves one stage on with `jnp.roll` under a sharding constraint, which XLA lowers to a
collective-permute between neighbouring stages (the ppermute of a shard_map schedule). Why this and not a
shard_map that is manual over `stage` only:
- it stays in the Auto (GSPMD) mode the rest of the model uses: the `data`, `fsdp` and `tensor` axes keep being
  placed by the same rules and propagation inside a stage (the vmap's `spmd_axis_name` adds `stage` to every
  sharding constraint the layers make), with no partially-manual region whose constraints and collectives would
  need a second, manual-mode description of the model;
- autodiff, `jax.checkpoint` (model.remat) and gradient accumulation (`train.grad_accum`, an outer scan) apply to it
  unchanged, so every objective's `loss_fn` (pretrain, SFT, reward, DPO, KTO, the RL policy updates) is pipelined
  without being rewritten: the backward pass is JAX's transpose of the forward scan (the GPipe order).
The price: idle (bubble) stages compute on stale data that is then discarded, rather than skipping work; in SPMD
every device runs the same program, so a skipped stage would not finish earlier anyway.

## Schedules
GPipe (R = 1): M microbatches enter stage 0 one per iteration; M + S - 1 iterations; bubble (S - 1) / (M + S - 1).
Circular (R > 1): device s holds virtual stages s, S + s, 2S + s, ... (layer l on device (l // Lv) % S); a
microbatch leaving the last device re-enters device 0 for its next repeat, so M >= S. R M + S - 1 iterations of
1 / R the work each: bubble (S - 1) / (R M + S - 1), for R times more stage-to-stage transfers. The parameters stay
in the contiguous layout at rest (portable checkpoints), so the circular step first moves each device's blocks to
the interleaved layout (an all-to-all of the block parameters over `stage` in the forward, of their gradients in the
backward: the bytes of one FSDP all-gather, not more memory).
Microbatch j takes rows j, j + M, j + 2M, ...: each microbatch stays spread over the data-parallel devices.
The circular buffer of microbatch activations (M, n, D) is replicated over `stage` (the last stage's output is
broadcast to every stage device each iteration); it is the size of the layer input the plain scan holds anyway.

## The embedding and the head
They are not pipelined: replicated over `stage` and sharded over the other axes by their usual rules (`vocab` over
`tensor`, `embed` over `fsdp`), and computed before and after the pipeline on every stage device. In SPMD a
"first-stage-only" embedding would still occupy every device for the same time (the other devices wait or compute a
masked copy), while this choice keeps the rules table, the checkpoints and every loss function unchanged. The cost is
the embedding and head FLOPs repeated S times: small next to the layers of a model deep enough to need `stage`.

## 1F1B: not built, and why
JAX derives the backward from the whole forward: `value_and_grad` of a scan over R M + S - 1 iterations stores the
residuals of every iteration, i.e. every microbatch's activations on every stage, which is GPipe's memory. A 1F1B
order (at most S microbatches alive per stage) needs the backward hand-scheduled inside the same loop: `jax.vjp` of
each stage at forward time, the residuals carried explicitly in an S-slot buffer, and the loss cotangent of a
microbatch available as soon as it leaves the last stage. That last part means the pipeline must own the loss and
its gradient (the head, the objective and its per-batch normalisers such as DPO's pairs or GRPO's group means), which
inverts the `grad_step(loss_fn, params, batch)` contract every stage's objective is written against; it is not a
local change to this module, so `pipeline.schedule="1f1b"` is a ConfigError. The supported way to bound activation
memory is `train.grad_accum`: each accumulation step pipelines only batch / grad_accum rows, at the cost of the
bubble being paid once per accumulation step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign.errors import ConfigError
from jaxalign.parallel.mesh import Rules

# layer(layer_params, x_nxD, cos_bxTxDh2, sin_bxTxDh2, segment_ids_bxT | None) -> x_nxD: one transformer block.
LayerFn = Callable[..., jax.Array]
RopeFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def active(rules: Rules | None) -> bool:
    """Whether the layers run as a pipeline: the mesh has a `stage` axis of more than one device."""
    return rules is not None and rules.mesh.shape["stage"] > 1


def plan(rules: Rules, n_layers: int, rows: int | None = None) -> tuple[int, int, int]:
    """(S stages, R repeats, M microbatches) of the rules' schedule, checked against the model and `rows` (one-line
    ConfigErrors naming the keys)."""
    S = rules.mesh.shape["stage"]
    sched = rules.pipeline
    R = sched.repeats
    M = sched.microbatches or S
    if sched.schedule not in ("gpipe", "circular"):
        raise ConfigError(f"pipeline.schedule={sched.schedule!r} is not one of ['gpipe', 'circular']")
    if R > 1 and sched.schedule != "circular":
        raise ConfigError(f"pipeline.repeats={R} needs pipeline.schedule='circular', got {sched.schedule!r}")
    if n_layers % (S * R):
        raise ConfigError(
            f"model.n_layers={n_layers} is not divisible by mesh.stage={S} x pipeline.repeats={R}"
        )
    if sched.schedule == "circular" and M < S:
        raise ConfigError(f"pipeline.microbatches={M} must be >= mesh.stage={S} for schedule='circular'")
    if rows is not None and rows % M:
        raise ConfigError(
            f"a batch of {rows} rows does not split into pipeline.microbatches={M} (mesh.stage={S})"
        )
    return S, R, M


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The analytic idle share of a schedule: (S - 1) / (R M + S - 1) (GPipe: R = 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def _stage_layout(params: nnx.State, rules: Rules, S: int, R: int) -> nnx.State:
    """(L, ...) stacked block parameters -> (S, R, Lv, ...), the leading dim over `stage`: device s gets virtual
    stages r S + s (for R = 1 a local reshape of the contiguous layout)."""

    def move(var: nnx.Variable) -> nnx.Variable:
        x = var.get_value()
        L = x.shape[0]
        rest = rules.spec(var.get_metadata()["axes"], x.shape)[1:]
        x = x.reshape(R, S, L // (S * R), *x.shape[1:]).swapaxes(0, 1)
        x = jax.lax.with_sharding_constraint(x, NamedSharding(rules.mesh, P("stage", None, None, *rest)))
        return var.replace(x)

    return jax.tree.map(move, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def run_layers(
    layer: LayerFn,
    params: nnx.State,
    x_NxD: jax.Array,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    rope: RopeFn,
    rules: Rules,
) -> jax.Array:
    """The stacked layers `params` (leading dim L) applied to `x_NxD` (N = B T) as a pipeline over `stage`;
    equal to the plain scan `for l: x = layer(params[l], x, ...)` (the tests hold it to fp32 rtol 1e-5)."""
    B, T = positions_BxT.shape
    D = x_NxD.shape[-1]
    L = jax.tree.leaves(params)[0].shape[0]
    S, R, M = plan(rules, L, B)
    b = B // M
    mesh = rules.mesh
    batch = rules.spec(("batch",), (b,))[0]
    sharded = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    # Microbatch j = rows j, j + M, ...: (B, ...) -> (M, b, ...).
    micro = lambda x: x.reshape(b, M, *x.shape[1:]).swapaxes(0, 1)
    buf_MxnxD = sharded(micro(x_NxD.reshape(B, T, D)).reshape(M, b * T, D), P(None, batch, None))
    aux_M = {"positions": micro(positions_BxT)}
    if segment_ids_BxT is not None:
        aux_M["segment_ids"] = micro(segment_ids_BxT)
    stage_params = _stage_layout(params, rules, S, R)

    def stage(p_RxLv, r, x_nxD, aux_bxT):
        """One (virtual) stage: its Lv layers, repeat r's slice of this device's layers, on one microbatch."""
        p_Lv = jax.tree.map(lambda a: a[r], p_RxLv) if R > 1 else jax.tree.map(lambda a: a[0], p_RxLv)
        cos, sin = rope(aux_bxT["positions"])
        seg = aux_bxT.get("segment_ids")
        x_nxD, _ = jax.lax.scan(lambda x, p: (layer(p, x, cos, sin, seg), None), x_nxD, p_Lv)
        return x_nxD

    stages = jax.vmap(stage, spmd_axis_name="stage")
    on_stages = lambda x: sharded(x, P("stage", batch, *([None] * (x.ndim - 2))))

    def step(carry, t):
        buf_MxnxD, x_SxnxD, aux_S = carry
        # Stage 0 takes microbatch t mod M: a new one in the first repeat, else back from the last stage.
        m_in = t % M
        x_SxnxD = on_stages(x_SxnxD.at[0].set(buf_MxnxD[m_in]))
        aux_S = jax.tree.map(lambda a, src: on_stages(a.at[0].set(src[m_in])), aux_S, aux_M)
        r_S = jnp.clip((t - jnp.arange(S)) // M, 0, R - 1)
        y_SxnxD = on_stages(stages(stage_params, r_S, x_SxnxD, aux_S))
        # The last stage finished microbatch k = t - (S - 1) (when k >= 0): keep it for its next repeat, or as output.
        k = t - (S - 1)
        m_out = jnp.mod(k, M)
        done_nxD = jnp.where(k >= 0, y_SxnxD[S - 1], buf_MxnxD[m_out])
        buf_MxnxD = sharded(
            jax.lax.dynamic_update_index_in_dim(buf_MxnxD, done_nxD, m_out, 0), P(None, batch, None)
        )
        # Every stage's output becomes the next stage's input (a collective-permute over `stage`).
        shift = lambda a: on_stages(jnp.roll(a, 1, axis=0))
        return (buf_MxnxD, shift(y_SxnxD), jax.tree.map(shift, aux_S)), None

    x0_SxnxD = on_stages(jnp.zeros((S, b * T, D), x_NxD.dtype))
    aux0_S = jax.tree.map(lambda a: on_stages(jnp.zeros((S, *a.shape[1:]), a.dtype)), aux_M)
    (buf_MxnxD, _, _), _ = jax.lax.scan(step, (buf_MxnxD, x0_SxnxD, aux0_S), jnp.arange(R * M + S - 1))
    out_BxTxD = buf_MxnxD.reshape(M, b, T, D).swapaxes(0, 1).reshape(B, T, D)
    return rules.constrain(out_BxTxD.reshape(B * T, D), ("batch", "act_embed"))
