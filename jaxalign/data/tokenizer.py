"""Tokenizers: SentencePiece BPE (train and load) behind one small interface.

Training uses Llama-2-style settings: BPE, byte fallback, digits split, whitespace-only pieces allowed, identity
normalisation (text round-trips exactly), and the chat special tokens as user-defined symbols. A newline is a
user-defined symbol too, so it is a real piece rather than a byte fallback.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Protocol

import sentencepiece as spm

from jaxalign.errors import ConfigError

CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")


class Tokenizer(Protocol):
    """What every tokenizer backend provides."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, model_path: str):
        if not os.path.exists(model_path):
            raise ConfigError(f"tokenizer model {model_path!r} does not exist")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    special_tokens: tuple[str, ...] = CHAT_SPECIAL_TOKENS,
    seed_sentencepiece_size: int = 100_000,
) -> SentencePieceTokenizer:
    """Trains a BPE model on `texts` and writes `model_path` (atomically). The vocabulary may come out smaller than
    `vocab_size` on a small corpus; it is never larger."""
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(model_path) or ".") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            for t in texts:
                # SentencePiece trains on one sentence per line; the newline itself is a user-defined piece.
                for line in t.split("\n"):
                    if line:
                        f.write(line + "\n")
        prefix = os.path.join(tmp, "sp")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            user_defined_symbols=["\n", *special_tokens],
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            character_coverage=1.0,
            input_sentence_size=seed_sentencepiece_size,
            shuffle_input_sentence=True,
            num_threads=2,
            minloglevel=2,
        )
        os.replace(prefix + ".model", model_path)
    return SentencePieceTokenizer(model_path)
