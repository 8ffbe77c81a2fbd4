"""Tokenizers: SentencePiece BPE (train and load) behind one small interface.

Training uses Llama-2-style settings: BPE, byte fallback, digits split, whitespace-only pieces allowed, identity
normalisation (text round-trips exactly), and the chat special tokens as user-defined symbols. A newline is a
user-defined symbol too, so it is a real piece rather than a byte fallback.

Chat templates (`data/chat.py`) render conversations through the same interface; their markers are single pieces of
the vocabulary, so every template in `chat.TEMPLATES` lists its markers in `CHAT_SPECIAL_TOKENS`. Message contents
are encoded with `encode_text`, which never matches a marker (Hugging Face's `split_special_tokens`): a user who
types `<|im_end|>` gets the ordinary pieces of that text, not the end-of-turn token.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from jaxalign import storage
from jaxalign.errors import ConfigError

# Markers of the chat templates in data/chat.py: ChatML (Qwen, SmolLM), Llama 3 and Gemma. Their BOS is the
# tokenizer's own BOS, so `<|begin_of_text|>` and `<bos>` are not listed.
CHAT_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
)


@runtime_checkable
class Tokenizer(Protocol):
    """What every tokenizer backend provides (SentencePiece here; Hugging Face `tokenizers` in hf_tokenizer.py).

    Implementations must be picklable: input pipelines send them to worker processes.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without BOS or EOS."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Ids of `text` read as plain text: special markers in it (`<|im_end|>`, ...) become ordinary pieces, never
        their special ids (Hugging Face's `split_special_tokens=True`). Equal to `encode` on text without markers."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special pieces are rendered as their text."""
        ...

    def token_id(self, piece: str) -> int:
        """The id of `piece` if it is one piece of the vocabulary (a chat marker, "\\n"); else raises `KeyError`."""
        ...


class SentencePieceTokenizer:
    """A SentencePiece model file. Pickles as its serialized model (no file needed on the receiving side)."""

    def __init__(self, model_path: str):
        if not storage.exists(model_path):
            raise ConfigError(f"tokenizer model {model_path!r} does not exist")
        self.path = model_path
        try:
            # Read as bytes, so the file can be on an object store too.
            self.sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"tokenizer model {model_path!r} is not a SentencePiece model ({e})") from None
        self._set_ids()

    def _set_ids(self) -> None:
        self._plain: spm.SentencePieceProcessor | None = None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)

    def encode_text(self, text: str) -> list[int]:
        if self._plain is None:
            self._plain = _without_markers(self.sp)
        return self._plain.encode(text)

    def __getstate__(self) -> dict:
        return {"path": self.path, "proto": self.sp.serialized_model_proto()}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.sp = spm.SentencePieceProcessor(model_proto=state["proto"])
        self._set_ids()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_id(self, piece: str) -> int:
        token = self.sp.piece_to_id(piece)
        if token == self.sp.unk_id() and piece != self.sp.id_to_piece(token):
            raise KeyError(piece)
        return token


def _without_markers(sp: spm.SentencePieceProcessor) -> spm.SentencePieceProcessor:
    """The same model with its user-defined markers (every user-defined piece that is not whitespace: the chat
    markers) turned into control pieces, which SentencePiece never matches in text; ids are unchanged."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    for piece in proto.pieces:
        if piece.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED and piece.piece.strip():
            piece.type = model_pb2.ModelProto.SentencePiece.CONTROL
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str,
    vocab_size: int,
    special_tokens: tuple[str, ...] = CHAT_SPECIAL_TOKENS,
    seed_sentencepiece_size: int = 100_000,
) -> SentencePieceTokenizer:
    """Trains a BPE model on `texts` and writes `model_path` (atomically). The vocabulary may come out smaller than
    `vocab_size` on a small corpus; it is never larger."""
    # SentencePiece trains from and into local files: a local scratch directory, then the model is written where
    # it belongs (`storage.write_atomic`, local or object store).
    with tempfile.TemporaryDirectory() as tmp:
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
        with open(prefix + ".model", "rb") as f:
            storage.write_atomic(model_path, f.read())
    return SentencePieceTokenizer(model_path)
