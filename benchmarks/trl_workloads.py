"""TRL 1.16 on jaxalign's reference SFT and DPO workloads (the `--trl` rows of benchmarks/compare_tunix.py).

    python benchmarks/trl_workloads.py --workload sft|dpo [--steps 10]

Model: a transformers `LlamaForCausalLM` of the reference shapes of benchmarks/train_throughput.py (vocab 8192,
d_model 256, 4 layers, 4 heads of 64, 2 KV heads, MLP 1024, untied embeddings, float32, torch CPU with torch's
default intra-op threads), random init, no weights downloaded. Tokenizer: a word-level `PreTrainedTokenizerFast`
whose tokens are the ids' decimal strings (0, 1: <pad>, <eos>) (TRL wants one; the datasets are already tokenized, so it only supplies
pad/eos ids). Optimizer as jaxalign's OptimConfig: AdamW (0.9, 0.95, weight decay 0.1), clip 1.0, lr 1e-3.
Float32 without activation checkpointing (`bf16=False`, `gradient_checkpointing=False`: TRL 1.16 defaults both
to True, and bf16 autocast on this CPU is several times slower).
  sft  SFTTrainer on 8 rows of 256 tokens (pre-tokenized `input_ids` + `completion_mask` on the last 3/4,
       `completion_only_loss`), batch 8, one optimizer step per batch.
  dpo  DPOTrainer on 8 pairs of 64 prompt + 192 completion tokens (text of ids, which it tokenizes itself),
       live reference model (a copy), batch 8; tokens counted as jaxalign counts them (chosen + rejected).
A step's time is the interval between consecutive `on_step_end` callbacks of `Trainer.train` (data collation,
forward, backward, clip, optimizer and scheduler step); compile-free, so the first step is dropped only as warm-up;
the median of `--steps` intervals. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

VOCAB = 8192


def make_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).float()


def make_tokenizer() -> PreTrainedTokenizerFast:
    # Special tokens are matched inside words before splitting, so they must not be digit strings.
    vocab = {"<pad>": 0, "<eos>": 1, **{str(i): i for i in range(2, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>"
    )


class StepTimes(TrainerCallback):
    """perf_counter() at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def common_args(out_dir: str, steps: int) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        max_steps=steps + 2,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        bf16=False,  # TRL 1.16 defaults both to True; the reference workload is float32 without remat
        gradient_checkpointing=False,
    )


def run(workload: str, steps: int) -> dict:
    rng = np.random.default_rng(0)
    B = 8
    n_rows = B * (steps + 2)
    timer = StepTimes()
    with tempfile.TemporaryDirectory(prefix="trl_bench_") as out_dir:
        if workload == "sft":
            from trl import SFTConfig, SFTTrainer

            T = 256
            ids = rng.integers(2, VOCAB, (n_rows, T)).tolist()
            mask = [[0] * (T // 4) + [1] * (T - T // 4)] * n_rows
            data = Dataset.from_dict({"input_ids": ids, "completion_mask": mask})
            trainer = SFTTrainer(
                model=make_model(),
                args=SFTConfig(**common_args(out_dir, steps), max_length=T, completion_only_loss=True),
                train_dataset=data,
                processing_class=make_tokenizer(),
                callbacks=[timer],
            )
            tokens = B * T
        else:
            from trl import DPOConfig, DPOTrainer

            P, C = 64, 192

            def text(n: int, eos: bool) -> list[str]:
                # TRL 1.16's DPOTrainer tokenizes text itself: ids as words; completions end on EOS so that
                # TRL appends none, and the prompt ends on a space so that no token spans the boundary.
                rows = rng.integers(2, VOCAB, (n_rows, n - eos)).astype(str).tolist()
                return [" ".join(r) + (" <eos>" if eos else " ") for r in rows]

            data = Dataset.from_dict(
                {"prompt": text(P, False), "chosen": text(C, True), "rejected": text(C, True)}
            )
            trainer = DPOTrainer(
                model=make_model(),
                ref_model=make_model(),
                args=DPOConfig(**common_args(out_dir, steps), max_length=P + C, beta=0.1),
                train_dataset=data,
                processing_class=make_tokenizer(),
                callbacks=[timer],
            )
            row = trainer.train_dataset[0]
            lengths = (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"]))
            assert lengths == (P, C, C), f"TRL tokenized a pair to {lengths} tokens, not {(P, C, C)}"
            tokens = 2 * B * (P + C)
        start = time.perf_counter()
        trainer.train()
    intervals = np.diff(timer.times)[
        1:
    ]  # the first interval still warms up the allocator and optimizer state
    step_s = float(np.median(intervals))
    return {
        "tokens_per_s": tokens / step_s,
        "step_s": step_s,
        "first_step_s": timer.times[0] - start,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True, choices=["sft", "dpo"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = {
        k: round(v, 4) if isinstance(v, float) else v for k, v in run(args.workload, args.steps).items()
    }
    from importlib.metadata import version

    result.update(
        workload=args.workload,
        trl=version("trl"),
        torch=torch.__version__,
        load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    print(f"TRL {result['trl']} {args.workload} on CPU")
    for k, v in result.items():
        print(f"  {k:<16} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
