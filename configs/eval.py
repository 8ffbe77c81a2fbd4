"""Evaluation of any policy checkpoint or Hugging Face model on the synthetic world's held-out splits, or on your
multiple-choice JSONL. Writes W/eval.json and prints the table.

    python -m jaxalign.main --config=configs/eval.py --config.workdir=runs/quickstart \\
        --config.model.init_from=ckpt:runs/quickstart/checkpoints/dpo \\
        --config.eval.baseline=ckpt:runs/quickstart/checkpoints/sft \\
        --config.eval.reference=ckpt:runs/quickstart/checkpoints/sft \\
        --config.eval.reward_model=runs/quickstart/checkpoints/reward --config.eval.name=dpo
      a few minutes on a 2-core CPU (not yet measured): about 400 greedy answers of up to 32 tokens on the reference
      8M-parameter model, plus the baseline's answers and the KL samples.
    python -m jaxalign.main --config=configs/eval.py:smoke --config.workdir=runs/eval_smoke
      under a minute on a 2-core CPU, from an empty workdir (a tiny model at random weights, 8 examples per task;
      measured 26 s of CPU time, 66-80 s wall on a machine shared 5 ways): tokenizer training, compiles, and the
      world's qa/arith/chat/perplexity tasks.

Your benchmark: --config.eval.world=False --config.eval.mc_input='mmlu/*.jsonl' (records {"question", "choices",
"answer": index or text}); reports mc_acc and mc_acc_norm as lm-eval's multiple-choice tasks. After a curation run
with decontamination, --config.eval.contamination=runs/curate/contamination.json adds each score on the clean items
(qa_exact_match_clean, mc_acc_clean, ...). A Hugging Face model:
--config.model.init_from=hf:/path with its architecture under model.* and data.chat_template='tokenizer'.
"""

import ml_collections

from jaxalign.config import REFERENCE_MODEL, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = defaults()
    c.job = "eval"
    # The reference model of configs/pretrain.py and configs/sft.py, so their checkpoints load as they are.
    c.model.update(REFERENCE_MODEL, attention="auto")
    c.mesh.update(data=1, fsdp=-1, tensor=1, stage=1)
    c.data.update(chat_template="chatml")
    c.eval.update(max_new_tokens=32, batch_size=16, kl_estimator="k3", temperature=0.0)
    if arg == "smoke":
        c.model.update(
            vocab_size=1024,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_ff=256,
            max_seq_len=512,
        )
        c.data.synthetic_entities = 100
        c.eval.update(max_new_tokens=8, batch_size=8, max_examples=8)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; accepted: 'smoke'")
    return c
