"""Hugging Face tokenizers: a `tokenizer.json` through the `tokenizers` package, plus the model's chat template.

`HFTokenizer` has the interface of `data.tokenizer.SentencePieceTokenizer` (vocab_size, bos_id, eos_id, pad_id,
encode, decode, piece, token_id), so pipelines take either; it pickles (to worker processes) like it. `encode` adds
no special tokens (the pipelines frame documents with bos_id ... eos_id themselves).

Chat templates (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) are untrusted code from the
checkpoint: they render in jinja2's `ImmutableSandboxedEnvironment`, set up as transformers does (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a non-escaping `tojson`), so rendered text and ids
match `tokenizer.apply_chat_template`. `encode_chat` also returns the assistant mask (1 on tokens the model should
learn to produce): from `{% generation %}` blocks when the template has them, exactly as transformers'
`return_assistant_tokens_mask`; otherwise by rendering each assistant turn's prefix with and without the turn and
taking the difference (trailing whitespace after the turn excluded).

Message contents are user text: a special token typed in one (`<|im_end|>`) must not become that token, or a user
could close their turn and write the assistant's. `encode_text` encodes with special tokens split (transformers'
`split_special_tokens=True`); `encode_chat` finds where the template put each content's special-token text (by
rendering the conversation again with those characters replaced by same-length placeholders) and encodes exactly
those characters as ordinary pieces, so the ids hold only the special tokens the template itself wrote.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from jaxalign import storage
from jaxalign.errors import ConfigError, DataError

SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Stands in for the characters of special tokens typed in message contents (a private-use code point).
_PLACEHOLDER = "\U000f8ff0"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ConfigError(
            "Hugging Face tokenizers need the optional `tokenizers` package (pip install tokenizers); "
            "SentencePiece .model files work without it"
        ) from e
    return tokenizers


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    return json.loads(storage.read_text(path))


class HFTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json [+ tokenizer_config.json, chat_template.jinja]) or a bare
    tokenizer.json file. Special tokens given as arguments override the directory's."""

    def __init__(
        self,
        path: str,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        tokenizers = _import_tokenizers()
        directory, json_path = (
            (path, storage.join(path, "tokenizer.json")) if storage.path(path).is_dir() else (None, path)
        )
        if not storage.exists(json_path):
            raise ConfigError(
                f"tokenizer {json_path!r} does not exist (a Hugging Face tokenizer needs tokenizer.json)"
            )
        self.path = path
        self.tokenizer = tokenizers.Tokenizer.from_str(storage.read_text(json_path))
        config: dict[str, Any] = {}
        if directory is not None:
            config = {
                **_read_json(storage.join(directory, "special_tokens_map.json")),
                **_read_json(storage.join(directory, "tokenizer_config.json")),
            }
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = given.get(name) or _token_content(config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        if "eos_token" not in self.special_tokens:
            raise ConfigError(
                f"tokenizer {path!r} names no eos_token: add tokenizer_config.json or pass eos_token="
            )
        self.eos_id = self.token_id(self.special_tokens["eos_token"])
        # Pipelines frame every document as bos_id ... eos_id; tokenizers without a BOS (Qwen) use EOS as the
        # document separator instead.
        self.bos_id = (
            self.token_id(self.special_tokens["bos_token"])
            if "bos_token" in self.special_tokens
            else self.eos_id
        )
        self.pad_id = (
            self.token_id(self.special_tokens["pad_token"])
            if "pad_token" in self.special_tokens
            else self.eos_id
        )
        self.chat_template = chat_template if chat_template is not None else _read_template(directory, config)
        self._plain = None  # the tokenizer of `encode_text`, made on first use
        specials = sorted(
            {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}, key=len
        )
        self._specials = re.compile("|".join(re.escape(t) for t in reversed(specials))) if specials else None

    # The `Tokenizer` protocol.
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        if self._plain is None:
            # A second instance: `encode_special_tokens` is state of the tokenizer, and pipelines may share this one.
            self._plain = type(self.tokenizer).from_str(self.tokenizer.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plain": None}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def token_id(self, piece: str) -> int:
        token_id = self.tokenizer.token_to_id(piece)
        if token_id is None:
            raise KeyError(f"{piece!r} is not in the vocabulary of the tokenizer {self.path!r}")
        return token_id

    # Chat templates.
    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The conversation as text, as `apply_chat_template(..., tokenize=False)` renders it."""
        return self._render(messages, add_generation_prompt, tools, documents, template_kwargs)[0]

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): the rendered conversation's token ids (no special tokens added beyond what the
        template writes) and 1 on the tokens of assistant turns, 0 elsewhere."""
        text, spans = self._render(messages, add_generation_prompt, tools, documents, template_kwargs)
        if spans is None:
            spans = self._diff_spans(messages, text, tools, documents, template_kwargs)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        typed = self._typed_specials(messages, text, add_generation_prompt, tools, documents, template_kwargs)
        mask = [0] * len(encoding.ids)
        # As transformers does: every token from the one holding a span's first character to the one holding its
        # last.
        for start, end in spans:
            if end <= start:
                continue
            first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
            if first is None:
                break
            for i in range(first, len(mask) if last is None else last + 1):
                mask[i] = 1
        if not typed:
            return encoding.ids, mask
        return self._split_typed(text, encoding, mask, typed)

    def _typed_specials(self, messages, text, add_generation_prompt, tools, documents, template_kwargs):
        """Character runs [start, end) of `text` that are special-token text typed in message contents."""
        if self._specials is None or not any(
            isinstance(m.get("content"), str) and self._specials.search(m["content"]) for m in messages
        ):
            return []
        hide = lambda match: _PLACEHOLDER * len(match.group())
        hidden = [
            dict(m, content=self._specials.sub(hide, m["content"]))
            if isinstance(m.get("content"), str)
            else m
            for m in messages
        ]
        other = self._render(hidden, add_generation_prompt, tools, documents, template_kwargs)[0]
        typed = [i for i, (a, b) in enumerate(zip(text, other, strict=False)) if a != b]
        if len(other) != len(text) or any(other[i] != _PLACEHOLDER for i in typed):
            raise DataError(
                f"chat template of {self.path!r} changes message contents that contain special tokens, so their "
                "special-token text cannot be kept as text; remove the special tokens from the messages"
            )
        runs: list[list[int]] = []
        for i in typed:
            if runs and runs[-1][1] == i:
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        return runs

    def _split_typed(self, text, encoding, mask, runs) -> tuple[list[int], list[int]]:
        """`encoding`'s ids and `mask` with the tokens covering each run replaced by the run's ordinary pieces (the
        tokens the template wrote, and all other tokens, unchanged)."""
        ids_out: list[int] = []
        mask_out: list[int] = []
        offsets = encoding.offsets
        i = 0
        for start, end in runs:
            while i < len(offsets) and offsets[i][1] <= start:
                ids_out.append(encoding.ids[i])
                mask_out.append(mask[i])
                i += 1
            covered = []
            while i < len(offsets) and offsets[i][0] < end:
                covered.append(i)
                i += 1
            lo = min([start, *(offsets[j][0] for j in covered)])
            hi = max([end, *(offsets[j][1] for j in covered)])
            plain = self.encode_text(text[lo:hi])
            ids_out.extend(plain)
            mask_out.extend([max((mask[j] for j in covered), default=0)] * len(plain))
        ids_out.extend(encoding.ids[i:])
        mask_out.extend(mask[i:])
        return ids_out, mask_out

    def _render(self, messages, add_generation_prompt, tools, documents, template_kwargs):
        """(text, generation spans or None when the template has no {% generation %} blocks)."""
        if not self.chat_template:
            raise ConfigError(
                f"tokenizer {self.path!r} has no chat template (chat_template.jinja or tokenizer_config.json)"
            )
        template = _compile(self.chat_template)
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = dict(
            self.special_tokens,
            **template_kwargs,
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
        )
        import jinja2

        blocks: list[str] = []
        spans: list[tuple[int, int]] = []
        try:
            with template.environment.track_generation(blocks, spans):
                for block in template.generate(**context):
                    blocks.append(block)
        except jinja2.TemplateError as e:
            raise DataError(f"chat template of {self.path!r}: {e}") from e
        text = "".join(blocks)
        return text, (spans if _GENERATION_TAG.search(self.chat_template) else None)

    def _diff_spans(self, messages, text, tools, documents, template_kwargs) -> list[tuple[int, int]]:
        """Assistant spans of a template without generation blocks: for assistant turn i, the text that rendering
        messages[: i + 1] adds to messages[:i] with the generation prompt."""
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prefix = self._render(messages[:i], True, tools, documents, template_kwargs)[0]
            upto = self._render(messages[: i + 1], False, tools, documents, template_kwargs)[0]
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise DataError(
                    f"chat template of {self.path!r} renders message {i} differently depending on what follows, so "
                    f"assistant tokens cannot be found by prefix; wrap assistant turns in {{% generation %}} blocks"
                )
            turn = upto[len(prefix) :]
            spans.append((len(prefix), len(prefix) + len(turn.rstrip())))
        return spans


def _read_template(directory: str | None, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` (transformers >= 4.50 writes it), else tokenizer_config.json's `chat_template` (a string,
    or a list of named templates of which "default" is used)."""
    if directory is not None and storage.exists(storage.join(directory, "chat_template.jinja")):
        return storage.read_text(storage.join(directory, "chat_template.jinja"))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """A sandboxed template with transformers' globals, filters and the `{% generation %}` tag."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body and records its character span."""

        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(track_generation=self.track)
            self._blocks: list[str] | None = None
            self._spans: list[tuple[int, int]] | None = None

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

        def _record(self, caller) -> str:
            text = caller()
            if self._blocks is not None:
                start = sum(len(b) for b in self._blocks)
                self._spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: list[str], spans: list[tuple[int, int]]):
            self._blocks, self._spans = blocks, spans
            try:
                yield
            finally:
                self._blocks, self._spans = None, None

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
