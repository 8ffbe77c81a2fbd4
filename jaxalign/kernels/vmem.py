"""TPU VMEM budget of the flash kernel: what each pass keeps in VMEM, per-generation capacity, block choice.

On TPU (Mosaic) every BlockSpec block is copied into VMEM; blocks whose index changes along the grid are double
buffered, the full-length blocks that stay put over the inner grid axis (K/V in the forward and dq passes, the GQA
group's Q, dO, lse, delta and query segment ids in the dk/dv pass) are single buffered (`pl.Buffered(1)`). VMEM
arrays are tiled: the last dim is padded to 128 lanes and the second-to-last to 8 rows of 32-bit words (16 for
bf16, 32 for 8-bit), so a `(N, 1)` float32 column costs as much as `(N, 128)`.

Legend (as in flash_attention.py): Tp, Sp padded query / key lengths, Dp padded head dim, G query heads per kv
head, bq, bk block sizes, c itemsize of q/k/v (bytes). All sizes are in bytes.

Per pass, `pass_vmem_bytes` counts (x2 for double-buffered blocks):
- fwd: q, o tiles (bq, Dp) c x2; lse tile (bq, 1) f32 x2; K, V (Sp, Dp) c x1; with segments, q ids (bq, 1) i32 x2
  and k ids (1, Sp) i32 x1; working values: o accumulator (bq, Dp) f32, row max and sum (bq, 1) f32, and
  `_TEMPORARIES` 32-bit (bq, bk) score-sized arrays.
- dq: q, dO, dq tiles (bq, Dp) c x2; lse, delta (bq, 1) f32 x2; K, V (Sp, Dp) c x1; segments as in fwd; working
  values: dq accumulator (bq, Dp) f32 and the score-sized temporaries.
- dkv (scores transposed, so per-query values are rows): Q, dO (G*Tp, Dp) c x1; lse, delta (1, G*Tp) f32 x1;
  k, v, dk, dv tiles (bk, Dp) c x2; with segments, q ids (1, Tp) i32 x1 and k ids (bk, 1) i32 x2; working values:
  dk, dv accumulators (bk, Dp) f32 and the temporaries.

`vmem_limit_bytes` for a pass is its need plus 25% (Mosaic's own spills and internal scratch, which this count does
not model), rounded up to a MiB; a pass fits a generation when that limit is within the generation's VMEM. The
limit goes into the Mosaic call's backend config (`scoped_memory_configs`); pltpu.CompilerParams documents that a
limit above XLA's own scoped default may also need `--xla_tpu_scoped_vmem_limit_kib` (not checkable without a TPU).

GPU (Triton) is not budgeted here: its blocks are pointers into HBM and only (bq, D) / (bk, D) tiles are staged in
shared memory, sized by Triton itself, which reports "out of resources" at compile time (not checkable here).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax

from jaxalign.errors import ConfigError

MiB = 1024 * 1024

# VMEM per TensorCore, bytes. Source: jax/_src/pallas/mosaic/tpu_info.py of jax 0.10.2 (`get_tpu_info`,
# `vmem_capacity_bytes`; tests/kernels/test_flash_vmem.py checks this table against it). The pipelining guide
# (docs.jax.dev/en/latest/pallas/pipelining.html) says 96 MB for v5p; the smaller figure is kept.
VMEM_CAPACITY_BYTES: dict[str, int] = {
    "v2": 16 * MiB,
    "v3": 16 * MiB,
    "v4": 16 * MiB,
    "v4i": 16 * MiB,
    "v5e": 128 * MiB,
    "v5p": 64 * MiB,
    "v6e": 128 * MiB,
    "7": 64 * MiB,
    "7x": 64 * MiB,
    "8i": 192 * MiB,
}

# `jax.Device.device_kind` of each generation (as matched by tpu_info.chip_version_from_device_kind).
DEVICE_KINDS: dict[str, str] = {
    "TPU v2": "v2",
    "TPU v3": "v3",
    "TPU v4": "v4",
    "TPU v4 lite": "v4i",
    "TPU v5e": "v5e",
    "TPU v5 lite": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6e": "v6e",
    "TPU v6 lite": "v6e",
    "TPU7": "7",
    "TPU7x": "7x",
    "TPU8i": "8i",
}

PASSES = ("fwd", "dq", "dkv")
_TEMPORARIES = 4  # 32-bit (bq, bk) values live at once in a kernel body: scores/probabilities, dp/ds, 2 iotas
_HEADROOM = 1.25
_MIN_BLOCK_Q, _MIN_BLOCK_K = 16, 128  # Triton's tl.dot minimum; one full lane row for the key-id tiles on TPU

_log = logging.getLogger(__name__)


def tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes of a (rows, cols) VMEM array: cols padded to 128 lanes, rows to 8 32-bit sublanes (packed below)."""
    sublanes = 8 * (4 // itemsize)
    return math.ceil(rows / sublanes) * sublanes * math.ceil(cols / 128) * 128 * itemsize


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The padded per-call shapes the kernel runs on (see the module legend)."""

    q_len: int  # Tp
    kv_len: int  # Sp
    head_dim: int  # Dp
    groups: int  # G
    itemsize: int  # c
    segments: bool


def pass_vmem_bytes(name: str, s: Shapes, block_q: int, block_k: int) -> int:
    """VMEM bytes one grid step of pass `name` ("fwd", "dq" or "dkv") holds, by the count in the module docstring."""
    bq, bk, c, Dp = block_q, block_k, s.itemsize, s.head_dim
    tile = tile_bytes
    work = _TEMPORARIES * tile(bq, bk, 4)
    if name in ("fwd", "dq"):
        full_kv = 2 * tile(s.kv_len, Dp, c)
        seg = 2 * tile(bq, 1, 4) + tile(1, s.kv_len, 4) if s.segments else 0
        if name == "fwd":
            tiles = 2 * (2 * tile(bq, Dp, c) + tile(bq, 1, 4))
            work += tile(bq, Dp, 4) + 2 * tile(bq, 1, 4)
        else:
            tiles = 2 * (3 * tile(bq, Dp, c) + 2 * tile(bq, 1, 4))
            work += tile(bq, Dp, 4)
        return full_kv + seg + tiles + work
    if name == "dkv":
        rows = s.groups * s.q_len
        full_q = 2 * tile(rows, Dp, c) + 2 * tile(1, rows, 4)
        seg = tile(1, s.q_len, 4) + 2 * tile(bk, 1, 4) if s.segments else 0
        tiles = 2 * 4 * tile(bk, Dp, c)
        work += 2 * tile(bk, Dp, 4)
        return full_q + seg + tiles + work
    raise ValueError(f"pass must be one of {PASSES}, got {name!r}")


def vmem_limit_bytes(need: int) -> int:
    """The scoped-VMEM limit a pass asks for: its need plus the headroom, rounded up to a MiB."""
    return math.ceil(need * _HEADROOM / MiB) * MiB


@dataclasses.dataclass(frozen=True)
class Plan:
    """Blocks for every pass and each pass's `vmem_limit_bytes` (fwd, dq, dkv); generation None: unchecked."""

    block_q: int
    block_k: int
    vmem_limits: tuple[int, int, int]
    generation: str | None


class FlashDoesNotFit(ConfigError):
    """The flash kernel's VMEM need exceeds the target TPU generation's capacity at every block size."""

    def __init__(self, reason: str):
        super().__init__(
            f"model.attention='flash': {reason}; use model.attention='auto' (falls back to XLA) or 'xla', or a "
            "shorter train.seq_len"
        )
        self.reason = reason


def _candidates(block_q: int, block_k: int):
    """(bq, bk) from the requested ones down, halving the larger first; larger blocks first."""
    pairs = {(block_q, block_k)}
    bq = block_q
    while bq >= min(_MIN_BLOCK_Q, block_q):
        bk = block_k
        while bk >= min(_MIN_BLOCK_K, block_k):
            pairs.add((bq, bk))
            bk //= 2
        bq //= 2
    return sorted(pairs, key=lambda p: (-p[0] * p[1], -p[1]))


def plan(s: Shapes, block_q: int, block_k: int, generation: str | None) -> Plan:
    """The largest blocks (at most the requested ones, which must divide the padded lengths) whose every pass fits
    `generation`'s VMEM, with each pass's limit. Without a generation (tracing on a host that is not a TPU, with no
    TPU abstract mesh), the requested blocks and their limits, unchecked. Raises FlashDoesNotFit when even the
    smallest blocks do not fit."""
    limits_for = lambda bq, bk: tuple(vmem_limit_bytes(pass_vmem_bytes(p, s, bq, bk)) for p in PASSES)
    if generation is None:
        return Plan(block_q, block_k, limits_for(block_q, block_k), None)
    capacity = VMEM_CAPACITY_BYTES[generation]
    for bq, bk in _candidates(block_q, block_k):
        limits = limits_for(bq, bk)
        if max(limits) <= capacity:
            return Plan(bq, bk, limits, generation)
    needs = {p: pass_vmem_bytes(p, s, block_q, block_k) for p in PASSES}
    worst = max(needs, key=needs.get)
    reason = (
        f"the flash kernel's {worst} pass needs {needs[worst] / MiB:.1f} MiB of VMEM "
        f"({vmem_limit_bytes(needs[worst]) / MiB:.0f} MiB with headroom) at padded T={s.q_len}, S={s.kv_len}, "
        f"head dim {s.head_dim}, {s.groups} query heads per kv head: more than TPU {generation}'s "
        f"{capacity // MiB} MiB at any block size"
    )
    raise FlashDoesNotFit(reason)


def target_platform() -> str:
    """The platform being traced for: the abstract mesh's device (set when lowering for another platform, as
    `jax.sharding.use_abstract_mesh` does), else the default backend. "gpu" for cuda and rocm."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def target_generation() -> str | None:
    """The TPU generation being traced for (abstract mesh device first, then the local devices), or None: not a
    TPU, or a device kind this table does not know (its limits are then not checked against a capacity)."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is None:
        if jax.default_backend() != "tpu":
            return None
        device = jax.devices()[0]
    if device.platform != "tpu":
        return None
    return DEVICE_KINDS.get(device.device_kind)


def log_fallback(reason: str) -> None:
    """One log line per distinct reason (the model traces the attention once per layer kind, not per call)."""
    if reason not in _logged:
        _logged.add(reason)
        _log.warning("attention='auto' uses XLA attention: %s", reason)


_logged: set[str] = set()
