"""Weighted mixtures of input sources (`data.mixture`), for every stage's training input.

`data.mixture` is a tuple of (glob, weight) pairs; on the command line a Python literal:

    --config.data.mixture='(("web/*.jsonl", 0.7), ("code/*.parquet", 0.3))'

A glob is what `data.input` takes (comma-separated globs, any file format); weights are positive numbers, normalised
to sum to 1. `data.input` and `data.mixture` are exclusive. `common.inputs` hands the stages a `Mixture` in place of
the glob, and `loader.assemble` builds one Grain stream per source (each shuffled, repeated and dealt into the
shards on its own) mixed by `grain.IterDataset.mix` before packing or batching.

Exactness. Grain's mix is deterministic, not sampled: it scales the smallest weight to 100 and truncates the others
to integers (`grain_proportions`), then sends example k of the mixture to the source where the running share of
the integer proportions steps up. Over any number of examples that is a multiple of the proportions' sum S, each
source gave exactly `n * p_i / S` of them, and every prefix stays within a few examples of its share (under 1 for
two sources; measured under 2.5 for four). Weights 0.75/0.25 (300/100)
or 0.5/0.3/0.2 (250/150/100) are exact as written; 0.7/0.3 becomes 233/100 (0.6997/0.3003). The mixture counts
examples after encoding (an SFT conversation, an LM document's chunk, a preference pair, an RL prompt), per shard.

Resume. The mixture's position (Grain's mix index) and every source's position are part of the `Loader`'s
checkpointed iterator state, so a restored run continues with the same examples as an uninterrupted one; the
mixture's files and weights are part of the `Layout`, so restoring under another mixture is a `CheckpointError`.

A mixture needs infinite epochs (training loaders); evaluation reads `data.eval_input`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from jaxalign.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources and their weights: `parts = ((glob, weight), ...)`, weights > 0 (not necessarily summing to 1)."""

    parts: tuple[tuple[str, float], ...]

    @property
    def globs(self) -> tuple[str, ...]:
        return tuple(glob for glob, _ in self.parts)

    @property
    def weights(self) -> tuple[float, ...]:
        """The weights normalised to sum to 1."""
        total = sum(w for _, w in self.parts)
        return tuple(w / total for _, w in self.parts)


def check(parts: Sequence[Sequence], key: str = "data.mixture") -> Mixture:
    """`parts` as a `Mixture`, or a one-line ConfigError naming `key`, the bad entry and what is accepted."""
    accepted = 'a tuple of (glob, weight) pairs, e.g. (("a/*.jsonl", 0.7), ("b/*.jsonl", 0.3))'
    if isinstance(parts, str) or not isinstance(parts, Sequence) or not parts:
        raise ConfigError(f"{key}={parts!r} must be {accepted}")
    out = []
    for i, part in enumerate(parts):
        if isinstance(part, str) or not isinstance(part, Sequence) or len(part) != 2:
            raise ConfigError(f"{key}[{i}]={part!r} must be a (glob, weight) pair; {key} must be {accepted}")
        glob, weight = part
        if not isinstance(glob, str) or not glob.strip():
            raise ConfigError(f"{key}[{i}]: the glob {glob!r} must be a non-empty string")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{key}[{i}]: the weight {weight!r} of {glob!r} must be a number")
        if weight <= 0:
            raise ConfigError(f"{key}[{i}]: the weight {weight!r} of {glob!r} must be > 0")
        out.append((glob, float(weight)))
    globs = [g for g, _ in out]
    if len(set(globs)) != len(globs):
        dup = next(g for g in globs if globs.count(g) > 1)
        raise ConfigError(f"{key}: the glob {dup!r} appears twice (give it one weight)")
    return Mixture(tuple(out))


def globs(pattern: str | Mixture) -> list[str]:
    """Every glob of a training input: the glob itself, or each source of a mixture (for passes over every record,
    e.g. tokenizer training or the DPO reference log-probs)."""
    return list(pattern.globs) if isinstance(pattern, Mixture) else [pattern]


def grain_proportions(weights: Sequence[float]) -> list[int]:
    """The integer proportions Grain's mix uses for `weights` (its `_float_to_int_proportions`: the smallest weight
    scaled to 100, the others scaled alike and truncated)."""
    scale = 100 / min(weights)
    return [int(w * scale) for w in weights]
