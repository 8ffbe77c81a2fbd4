"""The CCNet-style perplexity filter of curation (`curate.perplexity_*`): a small LM scores each kept document.

    model, tokenizer, rules, spec = load_model(config)   `curate.perplexity_model`, or a reference LM trained first
    scorer = Scorer(model, tokenizer, rules, batch_size, max_tokens)
    nll_N, tokens_N = scorer.score(texts)                mean token NLL (nats) per document, and its token count
    buckets, report = run(config, docs, stats)           curate.py's hook: which kept documents the filter removes

A document is scored as [bos] + its first `perplexity_max_tokens` token ids (cut to the model's max_seq_len): its
perplexity is exp(mean NLL of those tokens given the ones before). As CCNet (Wenzek et al. 2020) the documents are
split by percentiles of their perplexity over the whole corpus (`curate.perplexity_cuts`, CCNet's 33rd and 67th):
head (lowest perplexity: most like the LM's training text), middle, tail; `curate.perplexity_keep` names the buckets
kept, the others are removed with reason `perplexity:<bucket>`. A document with no tokens goes to the tail.

Speed: documents are sorted by length and batched `perplexity_batch_size` rows at a time, each batch padded to a
power-of-two length from 32 (so one run compiles a handful of shapes) and spread over the data-parallel devices;
one jitted function returns each row's summed NLL. Rows are right-padded: with causal attention a pad never affects
an earlier position, so a padded row scores exactly as the document alone (tested).

Reference LM (`curate.perplexity_reference=<glob>`): the pretrain job trains an LM of this config's `model.*` with
its `train.*` / `optim.*` on that text into W/curate_ref_lm (its own tokenizer, trained there unless
`data.tokenizer` is set); a re-run resumes or reuses its finished checkpoint. Scores are recomputed every run (the
map and write steps still skip finished shards).

Shape legend: B rows of a batch, W padded length, N documents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import config as config_lib
from jaxalign import storage
from jaxalign.config import Config
from jaxalign.errors import ConfigError
from jaxalign.models.logps import target_logps

MIN_WIDTH = 32
BUCKETS = ("head", "middle", "tail")


def width(n: int, limit: int) -> int:
    """The padded length of a row of n scored tokens: the next power of two >= max(n, 32), at most `limit`."""
    return min(limit, max(MIN_WIDTH, 1 << max(0, n - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nll_sums(graphdef: nnx.GraphDef, params: nnx.State, inputs_BxW, targets_BxW, mask_BxW):
    """Summed NLL (nats, float32 [B]) of each row's masked target tokens."""
    model = nnx.merge(graphdef, params)
    logps_BxW, _ = target_logps(model, model.hidden(inputs_BxW), targets_BxW)
    return -jnp.sum(logps_BxW * mask_BxW, axis=-1)


class Scorer:
    """Batched, jitted per-document mean token NLL under `model` (module doc)."""

    def __init__(self, model: Any, tokenizer: Any, rules: Any, batch_size: int, max_tokens: int):
        dp = 1 if rules is None else rules.data_parallel_size
        if batch_size % dp:
            raise ConfigError(
                f"curate.perplexity_batch_size={batch_size} is not divisible by the data-parallel size {dp}"
            )
        self.graphdef, self.params = nnx.split(model)
        self.tokenizer, self.rules, self.batch_size = tokenizer, rules, batch_size
        self.max_len = model.cfg.max_seq_len
        self.max_tokens = min(max_tokens, self.max_len)
        self.widths: set[int] = set()  # padded lengths compiled so far

    def ids(self, text: str) -> list[int]:
        """[bos] + the document's first max_tokens ids."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text)[: self.max_tokens]]

    def score(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean token NLL in nats [N] float64, scored tokens [N] int64); a document without tokens gets +inf."""
        rows = [self.ids(t) for t in texts]
        count_N = np.array([len(r) - 1 for r in rows], np.int64)
        nll_N = np.full(len(rows), np.inf)
        order = [i for i in np.argsort(count_N, kind="stable").tolist() if count_N[i] > 0]
        pad = self.tokenizer.pad_id
        place = (lambda x: x) if self.rules is None else self.rules.sharding(("batch", "length"))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            w = width(int(count_N[idx[-1]]), self.max_len)  # sorted by length: the last row is the longest
            self.widths.add(w)
            inputs = np.full((self.batch_size, w), pad, np.int32)
            targets = np.full((self.batch_size, w), pad, np.int32)
            mask = np.zeros((self.batch_size, w), np.float32)
            for b, i in enumerate(idx):
                r = rows[i]
                inputs[b, : len(r) - 1], targets[b, : len(r) - 1], mask[b, : len(r) - 1] = r[:-1], r[1:], 1
            arrays = [inputs, targets, mask]
            if self.rules is not None:
                arrays = [jax.device_put(a, place) for a in arrays]
            sums_B = np.asarray(_nll_sums(self.graphdef, self.params, *arrays), np.float64)
            nll_N[idx] = sums_B[: len(idx)] / count_N[idx]
        return nll_N, count_N

    def perplexities(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(perplexity exp(mean NLL) [N] float64, scored tokens [N] int64) of one shard's documents, in order.

        Both runners call this on the same documents (a shard's, in line order), so they form the same batches and
        get the same bits: see curate_beam_stages.py."""
        nll_N, count_N = self.score(texts)
        return np.exp(nll_N), count_N


def reference_lm(config: Config) -> str:
    """Trains (or resumes, or reuses) the reference LM on `curate.perplexity_reference`; returns its `ckpt:` path."""
    from jaxalign.stages import pretrain

    workdir = storage.join(config.workdir, "curate_ref_lm")
    sub = config_lib.replace(
        config,
        job="pretrain",
        workdir=workdir,
        model={"init_from": ""},
        data={"input": config.curate.perplexity_reference, "eval_input": ""},
        checkpoint={"directory": "", "enabled": True},
    )
    pretrain.run(sub)
    return "ckpt:" + storage.join(workdir, "checkpoints", "pretrain")


def load_model(config: Config) -> tuple[Any, Any, Any, str]:
    """(model, tokenizer, rules, spec) of the scoring LM. A `ckpt:` model takes its architecture from the
    checkpoint's saved config; an `hf:` one must match `model.*` (as the stages' `model.init_from`)."""
    from jaxalign.parallel.mesh import Rules
    from jaxalign.stages import common, model_init
    from jaxalign.train import checkpoint

    cfg = config.curate
    spec = cfg.perplexity_model or reference_lm(config)
    model_cfg = dataclasses.replace(config.model, init_from=spec)
    if spec.startswith("ckpt:"):
        saved = checkpoint.saved_config(checkpoint.find_step_dir(spec[5:]))["model"]
        fields = {f.name for f in dataclasses.fields(model_cfg)}
        model_cfg = dataclasses.replace(
            model_cfg, **{k: v for k, v in saved.items() if k in fields and k != "init_from"}
        )
    sub = config_lib.replace(config, model=model_cfg)
    rules = Rules.from_config(sub)
    tokenizer = common.load_tokenizer(common.tokenizer_path(sub))
    model = nnx.merge(*model_init.init_params(sub, rules, adapters=False))
    return model, tokenizer, rules, spec


def buckets_of(ppl_N: np.ndarray, cuts: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(bucket name per document [N], the perplexity cut points [2]): head below the first percentile's value,
    tail at or above the second's, middle between."""
    finite = ppl_N[np.isfinite(ppl_N)]
    values = np.percentile(finite, list(cuts)) if len(finite) else np.array([np.inf, np.inf])
    return bucket_names(ppl_N, values), values


def bucket_names(ppl_N: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bucket of each perplexity [N] given the cut points `values` [2] (exact: one comparison per document, so
    a document on a cut point lands the same way wherever it is bucketed)."""
    return np.array(BUCKETS, dtype=object)[np.searchsorted(values, ppl_N, side="right")]


def parse_cuts(cfg: Any) -> tuple[list[float], set[str]]:
    """(`curate.perplexity_cuts` as floats, the set of `curate.perplexity_keep` bucket names)."""
    return [float(x) for x in cfg.perplexity_cuts.split(",")], {
        x.strip() for x in cfg.perplexity_keep.split(",")
    }


def summarise(
    spec: str,
    ppl_N: np.ndarray,
    tokens_N: np.ndarray,
    cfg: Any,
    seconds: float,
    setup_seconds: float,
    widths: Sequence[int],
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(bucket per document [N], cut points [2], the report section) from every kept document's perplexity (any
    order: percentiles and counts do not depend on it). seconds: scoring; setup_seconds: loading (and training)."""
    cuts, keep = parse_cuts(cfg)
    bucket_N, values = buckets_of(ppl_N, cuts)
    finite = np.isfinite(ppl_N)
    report = {
        "model": spec,
        "documents": len(ppl_N),
        "tokens": int(tokens_N.sum()),
        "docs_per_s": round(len(ppl_N) / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 3),
        "setup_seconds": round(setup_seconds, 3),  # the reference LM's training included
        "compiled_lengths": sorted(set(widths)),
        "percentiles": cuts,
        "cut_points": [float(v) for v in values],
        "median_perplexity": float(np.median(ppl_N[finite])) if finite.any() else None,
        "buckets": {b: int((bucket_N == b).sum()) for b in BUCKETS},
        "kept_buckets": [b for b in BUCKETS if b in keep],
        "removed": int(sum((bucket_N == b).sum() for b in BUCKETS if b not in keep)),
    }
    return bucket_N, values, report


def run(config: Config, docs: Sequence[tuple[str, np.ndarray]], stats: Any) -> tuple[list[np.ndarray], dict]:
    """curate.py's hook. `docs`: per shard (its docs.jsonl of filter-passing records, [M] bool already removed).
    Returns per shard [M] the bucket of each removed document ("" where kept or already removed), and the report."""
    cfg = config.curate
    start = time.perf_counter()
    model, tokenizer, rules, spec = load_model(config)
    scorer = Scorer(model, tokenizer, rules, cfg.perplexity_batch_size, cfg.perplexity_max_tokens)
    load_seconds = time.perf_counter() - start
    ppl, tokens, owners = [], [], []
    t = time.perf_counter()
    for s, (path, dropped) in enumerate(docs):
        lines = storage.read_text(path).split("\n")  # not splitlines(): JSON text may hold U+2028 unescaped
        alive = np.flatnonzero(~dropped)
        ppl_M, count_M = scorer.perplexities([json.loads(lines[j])["text"] for j in alive])
        ppl.append(ppl_M)
        tokens.append(count_M)
        owners += [(s, int(j)) for j in alive]
    ppl_N = np.concatenate(ppl) if ppl else np.zeros(0)
    tokens_N = np.concatenate(tokens) if tokens else np.zeros(0, np.int64)
    seconds = time.perf_counter() - t
    stats.seconds["perplexity"] += seconds
    stats.docs["perplexity"] += len(ppl_N)

    bucket_N, _, report = summarise(spec, ppl_N, tokens_N, cfg, seconds, load_seconds, scorer.widths)
    keep = set(report["kept_buckets"])
    out = [np.full(len(dropped), "", dtype=object) for _, dropped in docs]
    for (s, j), bucket in zip(owners, bucket_N, strict=True):
        if bucket not in keep:
            out[s][j] = bucket
    return out, report
