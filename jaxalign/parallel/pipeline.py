"""Pipeline parallelism over the `stage` mesh axis: the GPipe, circular (interleaved) and 1F1B schedules, in SPMD JAX.

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

## 1F1B (`pipeline.schedule="1f1b"`): the backward hand-scheduled inside the loop
JAX derives a backward from a whole forward: `value_and_grad` of the GPipe scan stores the residuals of every
iteration, i.e. every microbatch's activations on every stage until the backward starts. 1F1B bounds that by
running microbatch m's backward as soon as its forward has left the last stage, which needs the loss cotangent per
microbatch inside the loop. Every jaxalign objective is a sum over microbatches (what `train.grad_accum` relies on:
`loss_sum` adds, whole-batch normalisers such as DPO's tokens per pair or GRPO's advantages are inputs), so
`value_and_grad` (used by `train.state.grad_step`, hence every stage's train step) takes the objective apart at its
one `run_layers` call without rewriting it: `pre` (the embedding, per microbatch) and `post` (final norm, head and
loss of one microbatch) are the objective itself with its layers answered by a hook, and the S stages run in
between as an SPMD rotation like GPipe's, each iteration a forward of microbatch t - s and a backward (recomputing
the stage from its stored input: stage-level remat) of microbatch t - 2S + 2 + s. Per stage at most 2S - 1 stage
inputs are alive (GPipe: the residuals of all M microbatches), at GPipe's bubble (S - 1) / (M + S - 1): `lax.cond`
skips the backward while the pipeline fills and the forward while it drains. benchmarks/pipeline_bench.py (4
stages, 8 layers of d128, batch 32 x 64, fp32) measures the per-device temporaries: 1F1B 36 MB at M = 4 and 16 MB at
M = 16, against GPipe's 161 MB and 100 MB (and circular's 119 MB). The price is the stage recomputation in the
backward (as `model.remat="full"` would cost GPipe). Limits (one-line ConfigErrors): M >= S; objectives that run the
layers twice per microbatch (a live reference inside the loss; jaxalign's stages compute references outside it);
LoRA (the stages run outside the objective's adapter context). Interleaved 1F1B (1F1B with `repeats`) is not
built: `circular` is the schedule for a smaller bubble.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxalign import losses
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
    if sched.schedule not in ("gpipe", "circular", "1f1b"):
        raise ConfigError(f"pipeline.schedule={sched.schedule!r} is not one of ['gpipe', 'circular', '1f1b']")
    if R > 1 and sched.schedule != "circular":
        raise ConfigError(f"pipeline.repeats={R} needs pipeline.schedule='circular', got {sched.schedule!r}")
    if n_layers % (S * R):
        raise ConfigError(
            f"model.n_layers={n_layers} is not divisible by mesh.stage={S} x pipeline.repeats={R}"
        )
    if sched.schedule in ("circular", "1f1b") and M < S:
        raise ConfigError(
            f"pipeline.microbatches={M} must be >= mesh.stage={S} for schedule={sched.schedule!r}"
        )
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


def _apply_layers(
    layer: LayerFn, rope: RopeFn, p_Lv: nnx.State, x_nxD: jax.Array, aux_bxT: dict
) -> jax.Array:
    """Lv stacked layers `p_Lv` applied in order to one microbatch (aux: its positions and segment ids)."""
    cos, sin = rope(aux_bxT["positions"])
    seg = aux_bxT.get("segment_ids")
    x_nxD, _ = jax.lax.scan(lambda x, p: (layer(p, x, cos, sin, seg), None), x_nxD, p_Lv)
    return x_nxD


def _micro(x: jax.Array, M: int) -> jax.Array:
    """(B, ...) -> (M, B / M, ...): microbatch j takes rows j, j + M, j + 2M, ... (spread over data parallelism)."""
    return x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)


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
    equal to the plain scan `for l: x = layer(params[l], x, ...)` (the tests hold it to fp32 rtol 1e-5).
    Schedule "1f1b" runs the forward alone as GPipe; `value_and_grad` schedules its training step."""
    hook = _HOOK.get()
    if hook is not None:
        return hook(layer, params, x_NxD, positions_BxT, segment_ids_BxT, rope, rules)
    B, T = positions_BxT.shape
    D = x_NxD.shape[-1]
    L = jax.tree.leaves(params)[0].shape[0]
    S, R, M = plan(rules, L, B)
    b = B // M
    mesh = rules.mesh
    batch = rules.spec(("batch",), (b,))[0]
    sharded = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    micro = lambda x: _micro(x, M)
    buf_MxnxD = sharded(micro(x_NxD.reshape(B, T, D)).reshape(M, b * T, D), P(None, batch, None))
    aux_M = {"positions": micro(positions_BxT)}
    if segment_ids_BxT is not None:
        aux_M["segment_ids"] = micro(segment_ids_BxT)
    stage_params = _stage_layout(params, rules, S, R)

    def stage(p_RxLv, r, x_nxD, aux_bxT):
        """One (virtual) stage: its Lv layers, repeat r's slice of this device's layers, on one microbatch."""
        p_Lv = jax.tree.map(lambda a: a[r], p_RxLv) if R > 1 else jax.tree.map(lambda a: a[0], p_RxLv)
        return _apply_layers(layer, rope, p_Lv, x_nxD, aux_bxT)

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


# --- 1F1B: the training step hand-scheduled, one forward and one backward per stage per iteration ---------------

# While `value_and_grad` takes an objective apart, `run_layers` hands its arguments to this hook instead of running.
_HOOK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "jaxalign_pipeline_hook", default=None
)


def _layer_calls(loss_fn: Callable, params: Any, batch: dict, replace: Callable) -> tuple[Any, list[tuple]]:
    """`loss_fn(params, batch)` with each `run_layers(...)` call answered by `replace(*args)` instead of running;
    -> (the objective's value, the calls' arguments)."""
    calls = []

    def hook(*args):
        calls.append(args)
        return replace(*args)

    token = _HOOK.set(hook)
    try:
        return loss_fn(params, batch), calls
    finally:
        _HOOK.reset(token)


def value_and_grad(loss_fn: Callable) -> Callable:
    """`jax.value_and_grad(loss_fn, has_aux=True)` for an objective `loss_fn(params, batch) -> (loss_sum, (weight,
    metric_sums))`; when its layers run as a pipeline with `pipeline.schedule="1f1b"`, the same values computed in
    1F1B order (`_one_f_one_b`)."""
    plain = jax.value_and_grad(loss_fn, has_aux=True)

    def value_and_grad_fn(params, batch):
        found = []

        def probe(p, b):  # which pipelines the objective runs, read off an abstract trace (nothing is staged)
            value, calls = _layer_calls(loss_fn, p, b, lambda *args: args[2])
            found.extend(c[6] for c in calls)
            return value

        jax.eval_shape(probe, params, batch)
        schedules = [r.pipeline.schedule if active(r) else None for r in found]
        if "1f1b" not in schedules:
            return plain(params, batch)
        if len(schedules) != 1:
            raise ConfigError(
                f"pipeline.schedule='1f1b' trains objectives that run the model's layers once per (micro)batch; this "
                f"one runs them {len(schedules)} times (a live reference or value model): use 'gpipe' or 'circular'"
            )
        return _one_f_one_b(loss_fn, params, batch, found[0])

    return value_and_grad_fn


def _one_f_one_b(loss_fn: Callable, params: Any, batch: dict, rules: Rules):
    """((loss_sum, (weight, metric_sums)), grads) of `loss_fn` over `batch`, its layers pipelined in 1F1B order.

    The objective is taken apart at its one `run_layers` call: `pre` (the embedding; and the stacked layer
    parameters as the objective passes them, so their gradient flows back through whatever made them) runs once for
    the whole batch; the layers run as S stages; `post` (final norm, head and loss) runs once per microbatch on its
    rows only, as gradient accumulation does, so the objective must be a sum over microbatches (every jaxalign loss
    is: `loss_sum` adds, per-batch normalisers are inputs). Iteration t: stage s runs the forward of microbatch
    t - s and, from its stored input (the stage recomputes its layers), the backward of microbatch t - 2S + 2 + s;
    the last stage's forward output goes through `post`'s VJP in the same iteration and its cotangent starts down
    the stages at once. A stage holds at most 2S - 1 inputs (a ring buffer) where GPipe keeps every microbatch's
    activations on every stage until the backward; M + 2S - 2 iterations, and `lax.cond` skips the backward while
    the pipeline fills and the forward while it drains, so the work is GPipe's: bubble (S - 1) / (M + S - 1).
    """
    S = rules.mesh.shape["stage"]
    M = rules.pipeline.microbatches or S
    rows = jax.tree.leaves(batch)[0].shape[0]
    if rows % M:
        raise ConfigError(
            f"a batch of {rows} rows does not split into pipeline.microbatches={M} (mesh.stage={S})"
        )
    split = jax.tree.map(lambda a: _micro(a, M), batch)
    static: dict[str, Any] = {}

    def capture(p, micro):
        """The objective's `run_layers` arguments on a microbatch (its layers answered with zeros)."""
        _, calls = _layer_calls(loss_fn, p, micro, lambda *args: jnp.zeros_like(args[2]))
        return calls[0]

    def pre(p):
        # Each microbatch's layer input is made by the objective from that microbatch's own rows, so `post` below
        # sees exactly the rows the layers ran on (however the objective arranges them, e.g. DPO's chosen and
        # rejected halves). The stacked layer parameters do not depend on the batch: taken once.
        layer, blocks, _, _, _, rope, _ = capture(p, jax.tree.map(lambda a: a[0], split))
        static.update(layer=layer, rope=rope)

        def embed(micro):
            _, _, x_nxD, positions_bxT, segment_ids_bxT, _, _ = capture(p, micro)
            return x_nxD, {"positions": positions_bxT, "segment_ids": segment_ids_bxT}

        x_MxnxD, aux_M = jax.lax.map(embed, split)
        return (x_MxnxD, blocks), aux_M

    (x_MxnxD, blocks), pre_vjp, aux_M = jax.vjp(pre, params, has_aux=True)
    if aux_M["segment_ids"] is None:
        del aux_M["segment_ids"]
    layer, rope = static["layer"], static["rope"]
    _, b, T = aux_M["positions"].shape
    n, D = x_MxnxD.shape[1:]
    L = jax.tree.leaves(blocks)[0].shape[0]
    plan(rules, L, b * M)
    K = 2 * S - 1  # stored stage inputs per stage
    mesh = rules.mesh
    row = rules.spec(("batch",), (b,))[0]
    sharded = lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    on_stages = lambda x: sharded(x, P("stage", row, *([None] * (x.ndim - 2))))
    buffer = lambda x: sharded(x, P(None, row, None))
    x_MxnxD = buffer(x_MxnxD)
    p_S = jax.tree.map(lambda v: v[:, 0], _stage_layout(blocks, rules, S, 1))
    stage_of = jnp.arange(S)

    def forward(p_Lv, x_nxD, m):
        return _apply_layers(layer, rope, p_Lv, x_nxD, jax.tree.map(lambda a: a[m], aux_M))

    def backward(p_Lv, x_nxD, m, g_nxD):
        _, vjp = jax.vjp(lambda p, x: forward(p, x, m), p_Lv, x_nxD)
        return vjp(g_nxD)

    forward_S = jax.vmap(forward, spmd_axis_name="stage")
    backward_S = jax.vmap(backward, spmd_axis_name="stage")

    def post(p, m, h_nxD):
        micro = jax.tree.map(lambda a: a[m], split)
        value, _ = _layer_calls(loss_fn, p, micro, lambda *args: h_nxD)
        return value

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    (loss0, (w0, sums0)) = jax.eval_shape(post, params, 0, x_MxnxD[0])
    zero_post = lambda: (
        jnp.zeros(loss0.shape, loss0.dtype),
        jnp.zeros(w0.shape, w0.dtype),
        losses.metrics_identity(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sums0)),
        zeros(params),
        jnp.zeros((n, D), x_MxnxD.dtype),
    )

    def head(m, h_nxD):
        loss, vjp, (w, sums) = jax.vjp(lambda p, h: post(p, m, h), params, h_nxD, has_aux=True)
        d_params, d_h = vjp(jnp.ones_like(loss))
        return loss, w, sums, d_params, d_h

    def step(carry, t):
        y_SxnxD, g_SxnxD, stash_SxKxnxD, dx_MxnxD, d_blocks, acc = carry
        f_S = t - stage_of  # forward microbatch per stage
        f_ok = (f_S >= 0) & (f_S < M)

        def run_forward(y_SxnxD, stash):
            x_in = jnp.roll(y_SxnxD, 1, axis=0).at[0].set(x_MxnxD[jnp.clip(t, 0, M - 1)])
            x_in = on_stages(x_in)
            slot = jnp.mod(f_S, K)
            kept = jax.vmap(lambda st, x, k, ok: jnp.where(ok, st.at[k].set(x), st))(stash, x_in, slot, f_ok)
            return on_stages(forward_S(p_S, x_in, jnp.clip(f_S, 0, M - 1))), on_stages(kept)

        y_SxnxD, stash_SxKxnxD = jax.lax.cond(
            t < M + S - 1, run_forward, lambda y, st: (y, st), y_SxnxD, stash_SxKxnxD
        )
        # The last stage finished microbatch m = t - (S - 1): its loss, the head's gradient, the cotangent of h.
        m = t - (S - 1)
        loss, w, sums, d_params, d_h = jax.lax.cond(
            (m >= 0) & (m < M), head, lambda m, h: zero_post(), jnp.clip(m, 0, M - 1), y_SxnxD[S - 1]
        )
        acc = (
            acc[0] + loss,
            acc[1] + w,
            losses.merge_metrics(acc[2], sums),
            jax.tree.map(jnp.add, acc[3], d_params),
        )

        def run_backward(g_SxnxD, d_blocks, dx_MxnxD):
            b_S = t - (2 * S - 2) + stage_of  # backward microbatch per stage
            b_ok = (b_S >= 0) & (b_S < M)
            g_in = on_stages(jnp.roll(g_SxnxD, -1, axis=0).at[S - 1].set(d_h))
            x_saved = on_stages(jax.vmap(lambda st, k: st[k])(stash_SxKxnxD, jnp.mod(b_S, K)))
            d_p, d_x = backward_S(p_S, x_saved, jnp.clip(b_S, 0, M - 1), g_in)
            keep = lambda d: jnp.where(b_ok.reshape(S, *([1] * (d.ndim - 1))), d, 0)
            d_blocks = jax.tree.map(lambda acc, d: acc + keep(d), d_blocks, d_p)
            # Stage 0's input cotangent is the embedding's, for microbatch b_S[0].
            dx_MxnxD = jnp.where(
                b_ok[0],
                jax.lax.dynamic_update_index_in_dim(dx_MxnxD, d_x[0], jnp.clip(b_S[0], 0, M - 1), 0),
                dx_MxnxD,
            )
            return on_stages(keep(d_x)), d_blocks, buffer(dx_MxnxD)

        g_SxnxD, d_blocks, dx_MxnxD = jax.lax.cond(
            t >= S - 1, run_backward, lambda *c: c, g_SxnxD, d_blocks, dx_MxnxD
        )
        return (y_SxnxD, g_SxnxD, stash_SxKxnxD, dx_MxnxD, d_blocks, acc), None

    init = (
        on_stages(jnp.zeros((S, n, D), x_MxnxD.dtype)),
        on_stages(jnp.zeros((S, n, D), x_MxnxD.dtype)),
        on_stages(jnp.zeros((S, K, n, D), x_MxnxD.dtype)),
        buffer(jnp.zeros((M, n, D), x_MxnxD.dtype)),
        zeros(p_S),
        zero_post()[:4],
    )
    (_, _, _, dx_MxnxD, d_blocks, acc), _ = jax.lax.scan(step, init, jnp.arange(M + 2 * S - 2))
    loss_sum, weight, sums, d_post = acc
    d_blocks = jax.tree.map(lambda d, v: d.reshape(v.shape), d_blocks, blocks)
    (d_pre,) = pre_vjp((dx_MxnxD, d_blocks))
    return (loss_sum, (weight, sums)), jax.tree.map(jnp.add, d_pre, d_post)
