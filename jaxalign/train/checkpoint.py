"""Checkpoints: an Orbax `CheckpointManager` with three items per step.

  state   the TrainState pytree (params, optimizer state, step, RNG key, update guard, the params' EMA when
          `train.ema_decay` > 0: without one the tree has no `ema` key, as before EMA existed), restored onto the
          shardings of the current run, whatever its mesh; with LoRA adapters (`jaxalign.peft`) its params are
          the trainable leaves only (adapters, a scalar head): the frozen base is the run's `model.init_from`;
  data    the Grain iterator state, one JSON file per process;
  config  the resolved config as JSON (data only: never executed).

Only committed steps are listed by Orbax (a save interrupted mid-way leaves a temporary directory that is ignored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxalign import storage
from jaxalign.config import CheckpointConfig, Config, DataConfig
from jaxalign.errors import CheckpointError
from jaxalign.peft import lora

# Config keys whose change makes a checkpoint unusable (model shapes) or silently changes the run (data order).
_MUST_MATCH = (
    "model",
    "lora",
    "train.batch_size",
    "train.seq_len",
    "data.input",
    "data.num_workers",
    "data.shards",
    "seed",
)


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else None
    return d


# Also when the data is the synthetic world (`data.input` empty in both): which world it is.
_MUST_MATCH_SYNTHETIC = (
    "data.synthetic_entities",
    "data.synthetic_seed",
    "data.synthetic_arith_max",
    "data.synthetic_rl_arithmetic",
    "data.synthetic_sft_arithmetic",
    "data.synthetic_sft_chatty",
    "data.synthetic_rl_show_work",
    "data.synthetic_arith_docs",
    "data.synthetic_preference_per_person",
)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences in the keys that must match between a checkpoint and a run."""
    diffs = []
    # A checkpoint with an EMA has a different state tree than one without (the decay itself may change).
    ema = [bool(_get(d, "train.ema_decay")) for d in (saved, current)]
    if ema[0] != ema[1]:
        diffs.append(
            f"train.ema_decay: checkpoint {_get(saved, 'train.ema_decay') or 0}, run "
            f"{_get(current, 'train.ema_decay') or 0} (an EMA cannot be added to or dropped from a run on resume)"
        )
    synthetic = not _get(saved, "data.input") and not _get(current, "data.input")
    for key in _MUST_MATCH + (_MUST_MATCH_SYNTHETIC if synthetic else ()):
        a, b = _get(saved, key), _get(current, key)
        if key in _MUST_MATCH_SYNTHETIC and a == {}:
            # A checkpoint written before this world key existed made the world of its default.
            a = getattr(DataConfig(), key.split(".")[1])
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: checkpoint {a.get(sub)!r}, run {b.get(sub)!r}")
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r}, run {b!r}")
    return diffs


class _IteratorSnapshot:
    """A loader's state frozen at save time, in the `get_state() -> bytes` form Grain's handler writes."""

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def _absolute(directory: str) -> str:
    """Orbax wants absolute local paths; a URL stays as it is (`os.path.abspath` would make `gs://b` `./gs:/b`)."""
    return os.path.abspath(os.path.expanduser(directory)) if storage.is_local(directory) else directory


def stage_directory(config: Config, stage: str) -> str:
    """Where `stage`'s checkpoints are: `checkpoint.directory/<stage>`, by default `<workdir>/checkpoints/<stage>`."""
    return storage.join(config.checkpoint.directory or storage.join(config.workdir, "checkpoints"), stage)


class Checkpointer:
    """Saves and restores one stage's checkpoints under `directory`. Always `close()` it (use `with`)."""

    def __init__(self, directory: str, cfg: CheckpointConfig, config: Config):
        self.directory = _absolute(directory)
        self.cfg = cfg
        self.config_dict = json.loads(config.to_json())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every or None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        step = self.manager.latest_step()
        if step is None:
            root = storage.path(self.directory)
            # On an object store the directory exists only once an object is under it (Orbax's `create` makes none).
            names = [p.name for p in root.iterdir()] if root.exists() else []
            leftovers = [n for n in names if ".orbax-checkpoint-tmp" in n]
            if leftovers:
                print(
                    f"checkpoint: {self.directory} holds only uncommitted temporary checkpoints {sorted(leftovers)}; "
                    "starting fresh",
                    flush=True,
                )
        return step

    def save(self, step: int, state: Any, loader: Any, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_tree(state)),
                # The iterator state is captured now: the async save runs after the loop has moved on.
                data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(loader.get_state())),
                config=ocp.args.JsonSave(self.config_dict),
            ),
            force=force,
        )

    def restore(self, step: int, state_shardings: Any, abstract_state: Any, loader: Any) -> Any:
        """Restores `step` onto `state_shardings`; the loader's iterator state is set in place."""
        saved_config = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        ).config
        diffs = config_differences(saved_config, self.config_dict)
        if diffs:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} does not fit this config: " + "; ".join(diffs)
            )
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            _saved_tree(abstract_state),
            _saved_tree(state_shardings),
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(loader)
            ),
        )
        state = restored.state
        if isinstance(state, dict):  # saved without an EMA (`_saved_tree`)
            state = abstract_state.replace(**state)
        if lora.is_adapted(abstract_state.params):  # the frozen base comes from the (concrete) given state
            frozen = lora.split_trainable(abstract_state.params)[1]
            return state.replace(params=lora.merge_trainable(state.params, frozen))
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _trainable(state: Any) -> Any:
    """`state` (a TrainState, or its shardings) with params cut to the trainable leaves when it has adapters."""
    params = getattr(state, "params", None)
    if params is None or not lora.is_adapted(params):
        return state
    return state.replace(params=lora.split_trainable(params)[0])


def _saved_tree(state: Any) -> Any:
    """What is saved of `state` (a TrainState, or its shardings): `_trainable(state)`, as a dict of its pytree fields
    without `ema` when the run keeps none, so that such checkpoints keep the tree they had before EMA existed (and
    restore into a state with `ema=None`)."""
    state = _trainable(state)
    if not dataclasses.is_dataclass(state) or getattr(state, "ema", 0) is not None:
        return state
    return {
        f.name: getattr(state, f.name)
        for f in dataclasses.fields(state)
        if f.metadata.get("pytree_node", True) and f.name != "ema"
    }


# --- reading another run's checkpoint (model.init_from="ckpt:...") -------------------------------------------------


def has_committed_step(directory: str) -> bool:
    """True when `directory` (a stage's checkpoint directory) holds a committed step to resume from."""
    root = storage.path(directory)
    if not root.is_dir():
        return False
    return any(d.name.isdigit() and (d / "commit_success.txt").exists() for d in root.iterdir())


EMA_SELECTOR = "#ema"


def split_selector(path: str) -> tuple[str, str]:
    """(path, item) of a `ckpt:` path: `PATH#ema` names the EMA of the params (`train.ema_decay`), a bare `PATH`
    the params themselves."""
    if path.endswith(EMA_SELECTOR):
        return path[: -len(EMA_SELECTOR)], "ema"
    return path, "params"


def find_step_dir(path: str) -> str:
    """The step directory a `ckpt:` path names: a step directory itself (it holds `state/`), the latest committed
    step of a stage's checkpoint directory, or of the one stage under a run directory's `checkpoints/`. A `#ema`
    selector (`split_selector`) is ignored here."""
    path = _absolute(split_selector(path)[0])
    root = storage.path(path)
    if (root / "state").is_dir():
        return path
    if not root.is_dir():
        raise CheckpointError(f"model.init_from: checkpoint path {path} does not exist")
    stages_dir = storage.join(path, "checkpoints")
    if storage.path(stages_dir).is_dir():
        stages = sorted(d.name for d in storage.path(stages_dir).iterdir() if d.is_dir())
        if len(stages) != 1:
            raise CheckpointError(
                f"model.init_from: run directory {path} has checkpoints of stages {stages}; name one: "
                f"'ckpt:{stages_dir}/<stage>'"
            )
        path = storage.join(stages_dir, stages[0])
    numbered = [d for d in storage.path(path).iterdir() if d.name.isdigit()]
    steps = sorted(int(d.name) for d in numbered if (d / "commit_success.txt").exists())
    if not steps:
        steps = sorted(int(d.name) for d in numbered if (d / "state").is_dir())
    if not steps:
        raise CheckpointError(f"model.init_from: {path} holds no committed checkpoint step")
    return storage.join(path, str(steps[-1]))


def saved_config(step_dir: str) -> dict:
    """The resolved config a checkpoint step was saved with (JSON data, never executed)."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(storage.path(step_dir) / "config")


@contextlib.contextmanager
def _quiet():
    """Reading one item of a step directly makes Orbax warn that the step's metadata file is one level up."""
    from absl import logging

    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def saved_state_metadata(step_dir: str) -> dict:
    """The saved state tree (nested dicts of Orbax array metadata with `.shape` and `.dtype`)."""
    with _quiet():
        meta = ocp.PyTreeCheckpointer().metadata(storage.path(step_dir) / "state")
    return meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree


def saved_params_metadata(step_dir: str, item: str = "params") -> dict:
    """The saved parameter tree (`item`: "params", or "ema" for their EMA); a CheckpointError when it is absent."""
    tree = saved_state_metadata(step_dir).get(item)
    if not tree:
        raise CheckpointError(
            f"{step_dir} holds no {item!r} (an EMA exists only in runs with train.ema_decay > 0)"
        )
    return tree


def restore_params(step_dir: str, target: dict, item: str = "params") -> dict:
    """Restores the subset of a checkpoint's parameters (`item`: "params" or "ema") named by `target` (a nested
    dict, like the saved params tree, of `jax.ShapeDtypeStruct`s with shardings, or of `np.ndarray`-typed
    `RestoreArgs` when `target` leaves are numpy arrays): only those arrays are read, each device its own shards."""
    with _quiet(), ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            storage.path(step_dir) / "state",
            args=ocp.args.PyTreeRestore(
                item={item: target},
                restore_args=ocp.checkpoint_utils.construct_restore_args({item: target}),
                partial_restore=True,
            ),
        )
    return restored[item]
