"""Every training objective as a pure function: the audited core (`core.py`: the convention, LM, SFT and reward
model; `preference.py`: DPO, CPO/SimPO, ORPO, KTO; `rl.py`: GRPO, PPO, KL estimators).

Shape suffixes: B rows (sequences, pairs or examples), T completion tokens, N = B * T tokens, V vocabulary,
P prompts, G generations per prompt.

Convention: an objective returns `(loss_sum, weight, metric_sums)`, sums over the rows or tokens of this (micro)batch
and the weight to divide by, so that summing all three over any split of a batch and dividing once gives the
full-batch value exactly (gradient accumulation and data parallelism are exact); `train.state.grad_step` divides.
`loss_sum / weight` is the loss TRL 1.16 reports for the same inputs and each metric is TRL's logged metric of the
same name. A metric value is one of:
- an array `s`: a sum whose mean is `s / weight`;
- `Mean(sum, count)`: a sum with its own denominator (e.g. a token-level ratio under a per-sequence loss);
- `Min(value)` / `Max(value)`: an extremum over rows (TRL's `clip_ratio/low_min`, `min_reward`, ...).
`merge_metrics` (from `metrics_identity`, e.g. as a scan carry) combines microbatches and `finalize_metrics` divides;
a plain `tree.map(add)` from zeros would get `Min`/`Max` wrong. Batch-level constants (KTO's `kto_kl`, the NLL's
`nll_tokens_per_pair` of CPO/ORPO) are computed once over the full batch and passed to every microbatch.

Sequence log-probs (`chosen_logps_B`, ...) are float32 sums of per-token log-probs over completion tokens; lengths
are completion-token counts; masks are 0/1 (float or bool).
"""

from jaxalign.losses.core import *  # noqa: F403
from jaxalign.losses.core import LossOut, Max, Mean, Metrics, Min  # noqa: F401
from jaxalign.losses.preference import *  # noqa: F403
from jaxalign.losses.rl import *  # noqa: F403
