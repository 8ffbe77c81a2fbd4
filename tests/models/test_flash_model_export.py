"""The whole Llama-3-8B train step with attention="flash" exports for TPU (Mosaic) and GPU (Triton) through
`jax.export` on this CPU-only machine: configs/llama3_8b.py at its own shapes (32 scanned layers, bf16 compute,
remat "full", T=8192), one row per step, abstract state and batch (nothing is allocated or compiled).

The kernel mode follows the lowering platform (`lax.platform_dependent` in `flash_attention._pallas`), so the
exported module holds the compiled kernels, not the Pallas interpreter, nor XLA's T x T attention. Mosaic needs the
TPU generation at lowering time (`tpu_info.get_device_kind`, which otherwise reads the local "cpu" device), given
here by an `AbstractMesh` with a TPU `AbstractDevice`; the same mesh tells `vmem.plan` which VMEM budget to meet.
`jax.export` refuses Triton's custom call (no compatibility guarantee) unless that check is disabled.

The mesh has one device: exporting a multi-device step for another platform needs that platform's device
assignment, which an abstract mesh does not give `jax.export` here; the per-shard kernel is the same one.
"""

import functools
import importlib.util
import json
import logging
import re

import jax
import pytest
from jax import export
from jax._src.mesh import AbstractDevice
from jax.sharding import AbstractMesh, AxisType

from jaxalign import config as config_lib
from jaxalign.kernels import vmem
from jaxalign.parallel.mesh import AXES, Rules
from jaxalign.stages import pretrain
from jaxalign.tools.memory import abstract_step_inputs

TRITON = "__gpu$xla.gpu.triton"
DEVICE_KIND = {"v5e": "TPU v5 lite", "v5p": "TPU v5p", "v6e": "TPU v6 lite", "v4": "TPU v4", "7x": "TPU7x"}


@functools.cache
def llama3_8b(attention: str) -> config_lib.Config:
    spec = importlib.util.spec_from_file_location("configs_llama3_8b", "configs/llama3_8b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.attention = attention
    c.train.update(batch_size=1, grad_accum=1)
    c.workdir, c.data.input = (
        "/unused",
        "/unused/*.jsonl",
    )  # required placeholders; nothing is read or written
    config = config_lib.from_config_dict(c)
    assert (config.model.n_layers, config.model.scan_layers, config.train.seq_len) == (32, True, 8192)
    return config


def mesh_for(platform: str, generation: str | None = None) -> AbstractMesh:
    kind = DEVICE_KIND[generation] if generation else "cuda"
    device = AbstractDevice(device_kind=kind, num_cores=1, platform=platform)
    return AbstractMesh(
        (1,) * len(AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), abstract_device=device
    )


def export_train_step(config: config_lib.Config, mesh: AbstractMesh, platform: str) -> export.Exported:
    """`pretrain.train_step` (loss, gradients, AdamW update) exported for `platform` from abstract inputs."""
    state, batch, shardings, batch_sharding = abstract_step_inputs(config, Rules(mesh, config.mesh.rules))
    step = jax.jit(
        functools.partial(
            pretrain.train_step, optim=config.optim, z_loss=config.train.z_loss, microbatches=1
        ),
        in_shardings=(shardings, {k: batch_sharding for k in batch}),
        out_shardings=(shardings, None),
    )
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(step, platforms=[platform], disabled_checks=checks)(state, batch)


def tpu_kernels(text: str) -> list[tuple[str, int]]:
    """(kernel name, vmem_limit_bytes) of every Mosaic call in the exported module's text; the limit is the size
    of the scoped-VMEM config in the call's JSON backend config (quotes escaped as \\22 in MLIR text)."""
    out = []
    for line in text.splitlines():
        if "custom_call @tpu_custom_call" in line:
            config = json.loads(
                re.search(r'backend_config = "(.*?)", kernel_name', line)[1].replace("\\22", '"')
            )
            (scoped,) = config["scoped_memory_configs"]
            out.append((re.search(r'kernel_name = "(\w+)"', line)[1], scoped["size"]))
    return out


@pytest.mark.parametrize("generation", ["v5e", "7x"])  # 128 and 64 MiB; v5p and v6e are alike
def test_train_step_exports_for_tpu_with_the_vmem_limits(generation):
    config = llama3_8b("flash")
    text = export_train_step(config, mesh_for("tpu", generation), "tpu").mlir_module()
    kernels = tpu_kernels(text)
    # Forward in the forward scan, forward again (remat "full") and dq, dk/dv in the backward scan.
    assert sorted(name for name, _ in kernels) == sorted(
        ["flash_attention_fwd", "flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"]
    )
    cfg = config.model
    shapes = vmem.Shapes(8192, 8192, cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, 2, segments=True)
    expected = {
        f"flash_attention_{p}": vmem.vmem_limit_bytes(vmem.pass_vmem_bytes(p, shapes, 128, 128))
        for p in vmem.PASSES
    }
    for name, limit in kernels:
        assert limit == expected[name] <= vmem.VMEM_CAPACITY_BYTES[generation]
    assert "8192x8192" not in text  # no XLA attention scores, no interpreter materialising them


def test_train_step_exports_for_gpu_through_triton():
    text = export_train_step(llama3_8b("flash"), mesh_for("cuda"), "cuda").mlir_module()
    assert text.count(f"custom_call @{TRITON}") == 4  # fwd twice (remat), dq, dk/dv
    assert "tpu_custom_call" not in text and "8192x8192" not in text


def test_flash_that_does_not_fit_is_a_config_error():
    """TPU v4 has 16 MiB of VMEM; the dk/dv pass keeps the group's Q and dO, 2 x 4 x 8192 x 128 x 2 B = 16 MiB."""
    with pytest.raises(
        vmem.FlashDoesNotFit, match=r"model.attention='flash': the flash kernel's dkv pass needs"
    ):
        export_train_step(llama3_8b("flash"), mesh_for("tpu", "v4"), "tpu")


def test_auto_falls_back_to_xla_where_the_kernel_does_not_fit(caplog, monkeypatch):
    monkeypatch.setattr(vmem, "_logged", set())  # logged once per process and reason: count this test's only
    with caplog.at_level(logging.WARNING, logger=vmem.__name__):
        text = export_train_step(llama3_8b("auto"), mesh_for("tpu", "v4"), "tpu").mlir_module()
    assert "tpu_custom_call" not in text and "8192x8192" in text  # XLA attention
    reasons = [r.getMessage() for r in caplog.records if r.name == vmem.__name__]
    assert (
        len(reasons) == 1
        and "the flash kernel's dkv pass needs" in reasons[0]
        and "TPU v4's 16 MiB" in reasons[0]
    )
    # Where it fits, "auto" keeps the kernel.
    text = export_train_step(llama3_8b("auto"), mesh_for("tpu", "v6e"), "tpu").mlir_module()
    assert len(tpu_kernels(text)) == 4


def test_auto_follows_the_lowering_platform():
    text = export_train_step(llama3_8b("auto"), mesh_for("cuda"), "cuda").mlir_module()
    assert text.count(f"custom_call @{TRITON}") == 4
