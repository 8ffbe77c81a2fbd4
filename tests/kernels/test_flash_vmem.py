"""The flash kernel's TPU VMEM budget (`jaxalign.kernels.vmem`): the capacity table equals JAX's own `tpu_info`,
each pass's count equals a count by hand, and the chosen blocks fit each generation."""

import pytest
from jax._src.pallas.mosaic import tpu_info

from jaxalign.kernels import vmem

MiB = 2**20
LLAMA3_8B = vmem.Shapes(q_len=8192, kv_len=8192, head_dim=128, groups=4, itemsize=2, segments=True)


@pytest.mark.parametrize("device_kind", sorted(vmem.DEVICE_KINDS))
def test_capacity_table_is_jax_tpu_info(device_kind):
    info = tpu_info.get_tpu_info_for_chip(tpu_info.chip_version_from_device_kind(device_kind), 1)
    assert vmem.VMEM_CAPACITY_BYTES[vmem.DEVICE_KINDS[device_kind]] == info.vmem_capacity_bytes


def test_tile_padding():
    assert vmem.tile_bytes(8192, 1, 4) == 8192 * 128 * 4  # a float32 column takes 128 lanes
    assert vmem.tile_bytes(1, 8192, 4) == 8 * 8192 * 4  # a row takes 8 sublanes
    assert vmem.tile_bytes(1, 1, 2) == 16 * 128 * 2  # bf16 packs 16 rows per 8 sublanes
    assert vmem.tile_bytes(200, 80, 4) == 200 * 128 * 4


def test_llama3_8b_counts_by_hand():
    """T = S = 8192, head dim 128, G = 4, bf16, packed, bq = bk = 128."""
    tile = 128 * 128  # elements of a (128, 128) tile; a (128, 1) column pads to it
    score_temps = 4 * tile * 4  # four f32 (bq, bk) values
    fwd = (
        2 * 8192 * 128 * 2  # K, V, single-buffered
        + 8 * 8192 * 4  # key ids (1, S) int32, single
        + 2 * tile * 4  # query ids (bq, 1) int32, double
        + 2 * (2 * tile * 2 + tile * 4)  # q, o tiles bf16 and the lse column f32, double
        + score_temps
        + tile * 4  # o accumulator f32
        + 2 * tile * 4  # row max and row sum columns f32
    )
    assert vmem.pass_vmem_bytes("fwd", LLAMA3_8B, 128, 128) == fwd == 5308416
    dq = fwd - 2 * (2 * tile * 2 + tile * 4) - 2 * tile * 4 + 2 * (3 * tile * 2 + 2 * tile * 4)
    assert vmem.pass_vmem_bytes("dq", LLAMA3_8B, 128, 128) == dq
    dkv = (
        2 * 4 * 8192 * 128 * 2  # the group's Q and dO, single
        + 2 * 8 * 4 * 8192 * 4  # lse and delta as (1, G*T) f32 rows, single
        + 8 * 8192 * 4  # query ids (1, T) int32, single
        + 2 * tile * 4  # key ids (bk, 1) int32, double
        + 2 * 4 * tile * 2  # k, v, dk, dv tiles bf16, double
        + score_temps
        + 2 * tile * 4  # dk, dv accumulators f32
    )
    assert vmem.pass_vmem_bytes("dkv", LLAMA3_8B, 128, 128) == dkv == 19 * MiB
    assert [vmem.vmem_limit_bytes(n) for n in (fwd, dq, dkv)] == [7 * MiB, 7 * MiB, 24 * MiB]


def test_unpadded_f32_counts_by_hand():
    """T = S = 256 (padded), head dim 128 (80 padded), G = 1, float32, no segments, bq = bk = 128."""
    tile = 128 * 128 * 4
    dkv = 2 * 256 * 128 * 4 + 2 * 8 * 256 * 4 + 2 * 4 * tile + 4 * tile + 2 * tile
    shapes = vmem.Shapes(256, 256, 128, 1, 4, segments=False)
    assert vmem.pass_vmem_bytes("dkv", shapes, 128, 128) == dkv == 1196032
    fwd = 2 * 256 * 128 * 4 + 2 * (2 * tile + tile) + 4 * tile + tile + 2 * tile
    assert vmem.pass_vmem_bytes("fwd", shapes, 128, 128) == fwd


@pytest.mark.parametrize("generation", sorted(vmem.VMEM_CAPACITY_BYTES))
def test_llama3_8b_fits_where_the_group_fits(generation):
    """The dk/dv pass needs 19 MiB (24 MiB with headroom): every generation with 64 MiB or more runs it at the
    requested blocks; the 16 MiB ones cannot at any block size."""
    capacity = vmem.VMEM_CAPACITY_BYTES[generation]
    if capacity < 24 * MiB:
        with pytest.raises(
            vmem.FlashDoesNotFit, match=f"dkv pass needs 19.0 MiB .* TPU {generation}'s 16 MiB"
        ):
            vmem.plan(LLAMA3_8B, 128, 128, generation)
    else:
        plan = vmem.plan(LLAMA3_8B, 128, 128, generation)
        assert (plan.block_q, plan.block_k, plan.vmem_limits) == (128, 128, (7 * MiB, 7 * MiB, 24 * MiB))


@pytest.mark.parametrize("generation", ["v4", "v5e"])
def test_blocks_shrink_until_every_pass_fits(generation):
    """Head dim 256, G = 1, T = 8192, bf16: with 512 x 512 blocks the tiles and score-sized temporaries push every
    pass past v4's 16 MiB (15.25-16.25 MiB before headroom), so v4 gets the largest smaller blocks that fit
    (256 x 256); v5e keeps the requested ones."""
    shapes = vmem.Shapes(8192, 8192, 256, 1, 2, segments=True)
    capacity = vmem.VMEM_CAPACITY_BYTES[generation]
    limits = lambda bq, bk: [
        vmem.vmem_limit_bytes(vmem.pass_vmem_bytes(p, shapes, bq, bk)) for p in vmem.PASSES
    ]
    plan = vmem.plan(shapes, 512, 512, generation)
    assert list(plan.vmem_limits) == limits(plan.block_q, plan.block_k)
    assert max(plan.vmem_limits) <= capacity
    if generation == "v5e":
        assert (plan.block_q, plan.block_k) == (512, 512)
        return
    assert max(limits(512, 512)) > capacity
    area = plan.block_q * plan.block_k
    assert area < 512 * 512 and plan.block_q >= 16 and plan.block_k >= 128
    for bq in (512, 256, 128, 64, 32, 16):  # no larger block pair fits
        for bk in (512, 256, 128):
            if bq * bk > area:
                assert max(limits(bq, bk)) > capacity, (bq, bk)


def test_no_generation_keeps_the_requested_blocks():
    plan = vmem.plan(LLAMA3_8B, 128, 128, None)
    assert (plan.block_q, plan.block_k, plan.generation) == (128, 128, None)
    assert plan.vmem_limits == (7 * MiB, 7 * MiB, 24 * MiB)
