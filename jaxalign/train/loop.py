"""The one training loop, used by every stage.

A stage hands over its jittable `step_fn(state, batch) -> (state, metrics)`, the state and its shardings, and a
checkpointable loader. The loop jits the step once with explicit in/out shardings and a donated state, restores
the latest checkpoint, and runs: metrics of step n-1 are fetched only after step n is dispatched, so the host
never stalls the device; it logs `metrics.jsonl`, TensorBoard and a progress bar, evaluates and checkpoints
periodically, saves at the next step boundary on SIGTERM/SIGINT, and always closes the checkpoint manager.
With an EMA of the params (`train.ema_decay`), every evaluation also runs on the EMA params: `eval/<metric>_ema`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxalign.config import Config
from jaxalign.errors import TrainingError
from jaxalign.train import perf
from jaxalign.train.checkpoint import Checkpointer, stage_directory
from jaxalign.train.metrics import MetricsLog

StepFn = Callable[..., tuple[Any, dict[str, jax.Array]]]
# `prepare(state, host_batch, step) -> (device batch, host metrics)`: turns what the loader yields into the step's
# batch (RL stages generate and score here); the default lays the host batch out with `to_global`.
Prepare = Callable[[Any, Any, int], tuple[dict[str, jax.Array], dict[str, float]]]


@dataclasses.dataclass
class Result:
    state: Any
    last_step: int
    preempted: bool
    history: list[dict[str, float]]


class Preemption:
    """Turns SIGTERM/SIGINT into a stop, with a saved checkpoint, at a step boundary.

    One process: a Python handler sets a flag that `should_stop` reads after every step.
    Several processes must stop at the same step, or the ones still running wait forever in the next collective.
    There JAX's distributed runtime (the preemption sync manager that `jax.distributed.initialize` starts) catches
    SIGTERM itself and tells every process through the coordination service, so a SIGTERM delivered to any one
    process (or to all) is enough; Orbax's `reached_preemption(step)` then returns True on every process at the
    same step (one past the furthest step any process had reached). No Python SIGTERM handler is installed (it
    would replace JAX's), and SIGINT (Ctrl-C) is re-sent to this process as SIGTERM to take the same path.
    `should_stop` must be called after every step on every process, as the sync protocol requires.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self.multiprocess = jax.process_count() > 1
        # Orbax's preemption sync point (JAX's `reached_preemption_sync_point`, False if the service is disabled);
        # imported here to keep this class self-contained.
        from orbax.checkpoint.multihost import reached_preemption

        self._reached_sync_point = reached_preemption
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; the caller owns signals then
        if self.multiprocess:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._to_sigterm)
        else:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    @staticmethod
    def _to_sigterm(signum, frame) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int, checkpointer: Checkpointer | None) -> bool:
        if self.multiprocess:
            return bool(self._reached_sync_point(step))
        return self.requested

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _inject_fault(stage: str, step: int, checkpointer: Checkpointer) -> None:
    """Fault injection for the resume tests: SIGKILL this process right after the save of a given step has been
    committed (`JAXALIGN_FAULT_KILL_AFTER_SAVE=<step>`) or while it is still being written in the background
    (`JAXALIGN_FAULT_KILL_DURING_SAVE=<step>`). `<stage>:<step>` (e.g. `sft:10`) fires in that stage only, for
    the end-to-end job's runs of several stages."""
    here = (str(step), f"{stage}:{step}")
    if os.environ.get("JAXALIGN_FAULT_KILL_AFTER_SAVE") in here:
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("JAXALIGN_FAULT_KILL_DURING_SAVE") in here:
        os.kill(os.getpid(), signal.SIGKILL)


def to_global(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays laid out by `shardings`."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in batch.items()}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _evaluate(eval_fn: Callable[[Any], dict[str, float]], state: Any) -> dict[str, float]:
    """`eval/<metric>` of the params and, when the state keeps an EMA, `eval/<metric>_ema` of the EMA params."""
    out = {f"eval/{k}": v for k, v in eval_fn(state).items()}
    if getattr(state, "ema", None) is not None:
        # The EMA is float32; evaluated in the params' dtype, as the model it would be loaded into.
        ema = jax.tree.map(lambda e, p: e.astype(p.dtype), state.ema, state.params)
        out.update({f"eval/{k}_ema": v for k, v in eval_fn(state.replace(params=ema)).items()})
    return out


def train(
    *,
    stage: str,
    config: Config,
    state: Any,
    state_shardings: Any,
    step_fn: StepFn,
    loader: Any,
    batch_shardings: dict[str, NamedSharding],
    tokens_per_step: int,
    flops_per_token: float,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    frozen: Any = None,
    frozen_shardings: Any = None,
    prepare: Prepare | None = None,
    eval_at_start: bool = False,
) -> Result:
    """Runs `step_fn` from the latest checkpoint of `stage` to `config.train.steps`.

    `frozen` (with its shardings) is a pytree the step reads but never updates, such as a reference model's
    parameters: it is passed as the step's third argument, neither donated nor checkpointed. `prepare` (see
    `Prepare`) builds each step's batch from the loader's output. `eval_at_start` also evaluates the initial
    state of a fresh run (logged at step 0), so a stage's effect on held-out metrics is measured, not assumed."""
    tcfg = config.train
    workdir = config.workdir
    checkpointer = (
        Checkpointer(stage_directory(config, stage), config.checkpoint, config)
        if config.checkpoint.enabled
        else None
    )
    preemption = Preemption()
    log = None
    progress = None
    try:
        start = 0
        if checkpointer is not None and (latest := checkpointer.latest_step()) is not None:
            state = checkpointer.restore(latest, state_shardings, state, loader)
            start = latest
            print(f"{stage}: resumed from step {start} ({checkpointer.directory})", flush=True)
        log = MetricsLog(workdir, stage, start)

        # The one place the step is jitted. Shardings: the state keeps its (FSDP / tensor) layout in and out and is
        # donated, so params and optimizer state are updated in place; batches are split over the data axes;
        # metrics are small replicated scalars.
        step_jit = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_shardings)
            + ((frozen_shardings,) if frozen is not None else ()),
            out_shardings=(state_shardings, None),
            donate_argnums=(0,),
        )
        frozen_args = (frozen,) if frozen is not None else ()
        # MFU is per device: the run's FLOP/s over the peak of all its devices (train.peak_flops is per device).
        peak = tcfg.peak_flops * jax.device_count() if tcfg.peak_flops else perf.peak_flops()
        if tcfg.progress and jax.process_index() == 0:
            from tqdm import tqdm

            progress = tqdm(total=tcfg.steps, initial=start, desc=stage, dynamic_ncols=True)

        history: list[dict[str, float]] = []
        pending = None  # (step number, device metrics) of the step dispatched before the current one
        last_time = time.perf_counter()
        last_logged = start
        last_saved = start
        preempted = False
        step = start

        def flush() -> None:
            """Fetches, checks and logs the pending step's metrics (if any)."""
            nonlocal pending, last_time, last_logged
            if pending is None:
                return
            (step, metrics, host_metrics), pending = pending, None
            values = {**host_metrics, **_scalars(metrics)}
            nonfinite = not math.isfinite(values["loss"]) or values.get("nonfinite", 0)
            if nonfinite and tcfg.nan_policy == "abort":
                last = checkpointer.latest_step() if checkpointer else None
                what = (
                    f"loss {values['loss']}"
                    if not math.isfinite(values["loss"])
                    else "gradients (finite loss)"
                )
                raise TrainingError(
                    f"{stage}: non-finite {what} at step {step} (update not applied); last good "
                    f"checkpoint: {'step ' + str(last) if last is not None else 'none'}. Set train.nan_policy='skip' "
                    "to skip such steps."
                )
            if step % tcfg.log_every and step not in (start + 1, tcfg.steps):
                return
            now = time.perf_counter()
            elapsed = now - last_time
            steps_done = step - last_logged
            tokens_per_s = tokens_per_step * steps_done / max(elapsed, 1e-9)
            values.update(
                tokens_per_s=tokens_per_s,
                mfu=tokens_per_s * flops_per_token / peak,
                step_s=elapsed / max(steps_done, 1),
            )
            last_time, last_logged = now, step
            log.write(step, values)
            history.append({"step": step, **values})
            if progress is not None:
                progress.set_postfix(
                    loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{values['mfu']:.2f}"
                )

        if eval_fn is not None and eval_at_start and start == 0:
            log.write(0, _evaluate(eval_fn, state))
        for step in range(start + 1, tcfg.steps + 1):
            if prepare is None:
                batch, host_metrics = to_global(next(loader), batch_shardings), {}
            else:
                batch, host_metrics = prepare(state, next(loader), step)
            state, metrics = step_jit(state, batch, *frozen_args)
            flush()
            pending = (step, metrics, host_metrics)
            if progress is not None:
                progress.update(1)
            if eval_fn is not None and tcfg.eval_every and step % tcfg.eval_every == 0:
                flush()
                log.write(step, _evaluate(eval_fn, state))
            if checkpointer is not None and step % config.checkpoint.every_steps == 0:
                # Log everything up to the checkpoint first: a run killed after this save resumes after `step`.
                flush()
                log.flush()
                checkpointer.save(step, state, loader)
                last_saved = step
                _inject_fault(stage, step, checkpointer)
            if preemption.should_stop(step, checkpointer):
                preempted = True
                break
        flush()
        log.flush()
        if checkpointer is not None and last_saved != step:
            checkpointer.save(step, state, loader, force=True)
        if preempted:
            print(f"{stage}: preempted; saved step {step}", flush=True)
        return Result(state=state, last_step=step, preempted=preempted, history=history)
    finally:
        preemption.restore()
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
        if checkpointer is not None:
            checkpointer.close()
