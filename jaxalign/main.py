"""Entry point: `python -m jaxalign.main --config=configs/<job>.py[:arg] --config.workdir=DIR [--config.k=v ...]`.

Parses the config, initialises JAX's distributed runtime when launched multi-process, and runs the job named by
`config.job`. A user error (bad config key or value, malformed input, mismatched checkpoint) prints one line and
exits with status 2.
"""

from __future__ import annotations

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jaxalign import config as config_lib
from jaxalign import storage
from jaxalign.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Job config file (configs/<job>.py[:arg]).", lock_config=True
)

# job name -> module with `run(config: Config)`.
JOBS = {
    "pretrain": "jaxalign.stages.pretrain",
    "sft": "jaxalign.stages.sft",
    "reward": "jaxalign.stages.reward",
    "dpo": "jaxalign.stages.dpo",
    "kto": "jaxalign.stages.kto",
    "grpo": "jaxalign.stages.grpo",
    "ppo": "jaxalign.stages.ppo",
    "curate": "jaxalign.data.curate",
    "pipeline": "jaxalign.pipeline",
    "eval": "jaxalign.eval.evaluate",
}


def run(config: config_lib.Config) -> None:
    if config.job not in JOBS:
        raise config_lib.ConfigError(f"job={config.job!r} is not one of {sorted(JOBS)}")
    from jaxalign.parallel import distributed

    distributed.maybe_initialize()
    config_lib.write_json(config, storage.join(config.workdir, "config.json"))
    importlib.import_module(JOBS[config.job]).run(config)


def main(argv: list[str]) -> None:
    # Orbax and Grain log every save at INFO through absl; progress and errors are ours to print.
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(config_lib.from_config_dict(_CONFIG.value))
    except UserError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a bad `--config.<key>` override reported as one line (exit 2) instead of a
    traceback: with `lock_config=True` an unknown key raises while the override is applied."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        name = str(e).strip("\"'")
        culprits = [a for a in argv if a.startswith("--config.") and name in a.split("=")[0].split(".")]
        where = culprits[0] if culprits else name
        print(
            f"ConfigError: unknown config key in {where} ({name!r} is not a key of the config)",
            file=sys.stderr,
        )
    except (flags.Error, ValueError, TypeError) as e:
        print(f"ConfigError: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


def entrypoint() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    entrypoint()
