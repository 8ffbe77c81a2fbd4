"""XLA flags of the test session. No JAX import here: tests/conftest.py sets them before JAX is loaded.

The suite's programs are tiny and run for milliseconds, but XLA's CPU compiler spends seconds on each: with LLVM's
backend optimisations, its expensive passes and the fusion emitters off, the same float32 arithmetic compiles in about
a third of the CPU time (tests/models/test_logps.py: 68 -> 24 CPU seconds). Jobs that train for hundreds of steps
(the world chain of tests/stages/test_world_effects.py) keep the default flags: there the run, not the compile, costs.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"


def flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS for a subprocess on `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices}" + (f" {FAST_COMPILE}" if fast_compile else "")
