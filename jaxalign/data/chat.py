"""Chat templates: a `messages` list rendered to token ids plus an assistant mask.

    chatml   <|im_start|>{role}\\n{content}<|im_end|>\\n                          (Qwen, SmolLM; no BOS)
    llama3   <bos><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    gemma    <bos><start_of_turn>{user|model}\\n{content}<end_of_turn>\\n          (system text opens the 1st user turn)

`add_generation_prompt=True` appends the assistant header, ready for sampling. The mask is 1 on the tokens an SFT
loss trains on: an assistant message's content and its end-of-turn marker; 0 on BOS, role headers, non-assistant
messages and the newline after an end-of-turn.

Each piece is tokenized on its own (as torchtune does), so a mask never splits a token: markers through
`tokenizer.token_id`, runs of newlines as newline pieces when the vocabulary has one (else through `encode`), role
names through `encode`, contents through `encode_text`, which never turns text into a marker: a user who writes
`<|im_end|>` in a message cannot end the turn or open a new one (Hugging Face's `split_special_tokens`). With a
SentencePiece model each content therefore starts with the dummy-prefix "▁", as text at the start of a pretraining
document does. The text form (`render_text`) matches the Hugging Face
templates of the same names.

    tokenizer  the tokenizer's own template (`encode_chat`: a Hugging Face tokenizer's jinja template, for imported
               models), with its own assistant mask
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxalign.data.tokenizer import Tokenizer
from jaxalign.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """One template: how a message opens and closes. Pieces are ("special", marker), ("text", s), ("nl", count)."""

    name: str
    # Text of the BOS in `render_text` ("" when the template has no BOS).
    bos_text: str
    header: tuple[tuple[str, Any], ...]  # "{role}" in a text piece is replaced by the role name
    end_of_turn: str
    after_turn: tuple[tuple[str, Any], ...]  # untrained pieces after the end-of-turn marker
    role_names: tuple[tuple[str, str], ...] = ()  # renames (Gemma calls the assistant "model")
    system_role: bool = True  # False: the system text opens the first user message, then a blank line

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([v for k, v in self.header if k == "special"] + [self.end_of_turn]))

    def role(self, role: str) -> str:
        return dict(self.role_names).get(role, role)


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        name="chatml",
        bos_text="",
        header=(("special", "<|im_start|>"), ("text", "{role}"), ("nl", 1)),
        end_of_turn="<|im_end|>",
        after_turn=(("nl", 1),),
    ),
    "llama3": ChatTemplate(
        name="llama3",
        bos_text="<|begin_of_text|>",
        header=(
            ("special", "<|start_header_id|>"),
            ("text", "{role}"),
            ("special", "<|end_header_id|>"),
            ("nl", 2),
        ),
        end_of_turn="<|eot_id|>",
        after_turn=(),
    ),
    "gemma": ChatTemplate(
        name="gemma",
        bos_text="<bos>",
        header=(("special", "<start_of_turn>"), ("text", "{role}"), ("nl", 1)),
        end_of_turn="<end_of_turn>",
        after_turn=(("nl", 1),),
        role_names=(("assistant", "model"),),
        system_role=False,
    ),
}


TOKENIZER = "tokenizer"  # use the tokenizer's own template


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ConfigError(f"data.chat_template={name!r} is not one of {[*sorted(TEMPLATES), TOKENIZER]}")
    return TEMPLATES[name]


def check_template(tokenizer: Tokenizer, name: str) -> None:
    """Fails before any work when the tokenizer cannot render `name` (a ConfigError naming the missing marker)."""
    if name == TOKENIZER:
        _own_template(tokenizer)
        return
    template = get_template(name)
    for piece in template.special_tokens:
        special_id(tokenizer, piece, template)


def _own_template(tokenizer: Tokenizer):
    encode_chat = getattr(tokenizer, "encode_chat", None)
    if encode_chat is None:
        raise ConfigError(
            f"data.chat_template={TOKENIZER!r} needs a tokenizer with its own chat template (a Hugging Face "
            f"tokenizer); {type(tokenizer).__name__} has none: pick one of {sorted(TEMPLATES)}"
        )
    return encode_chat


def check_messages(messages: Any, *, turns: bool = True, last: str | None = None) -> list[dict[str, str]]:
    """Returns `messages` if it is a non-empty list of {"role": system|user|assistant, "content": str} in a valid turn
    order; else raises a DataError saying which message is wrong (callers prefix file:line).

    The order (`turns`): a system message only first, then user and assistant turns alternating, starting with user.
    `last` names the role the conversation must end with ("assistant" for an SFT conversation, "user" for a prompt
    that a generated assistant turn follows). `turns=False` checks single messages only (a completion's messages,
    whose order is checked once they are rendered after their prompt)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"expected a non-empty list of messages, got {str(messages)[:80]!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"message {i} must be an object with 'role' and 'content', got {str(m)[:80]!r}")
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"message {i} content must be a string, got {type(m['content']).__name__}")
    if turns:
        previous = None
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "system" and i:
                raise DataError(
                    f"message {i} has role 'system'; only the first message may be a system message"
                )
            if role != "system" and previous in (None, "system") and role != "user":
                raise DataError(
                    f"message {i} has role {role!r}; the conversation must start with a user turn (after an "
                    "optional system message)"
                )
            if role == previous:
                raise DataError(
                    f"message {i} has role {role!r} like message {i - 1}; user and assistant turns must alternate"
                )
            previous = role
    if last is not None and messages[-1]["role"] != last:
        why = {  # `last` is "assistant" or "user"
            "assistant": "a conversation trained on ends with an assistant turn",
            "user": "the assistant's turn follows",
        }
        raise DataError(
            f"the last message (message {len(messages) - 1}) has role {messages[-1]['role']!r}; expected {last!r} "
            f"({why[last]})"
        )
    return messages


def _fold_system(template: ChatTemplate, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Gemma has no system role: the system text opens the first user message."""
    if template.system_role or not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if rest and rest[0]["role"] == "user":
        return [{"role": "user", "content": system + "\n\n" + rest[0]["content"]}, *rest[1:]]
    return [{"role": "user", "content": system + "\n\n"}, *rest]


def _pieces(template: ChatTemplate, messages: Sequence[dict[str, str]], add_generation_prompt: bool):
    """(kind, value, trained) for the whole conversation; kind is "bos", "special", "text" (template text such as
    role names), "content" (a message's text) or "nl"."""
    out: list[tuple[str, Any, bool]] = []
    if template.bos_text:
        out.append(("bos", None, False))

    def header(role: str) -> None:
        for kind, value in template.header:
            out.append(
                (kind, value.replace("{role}", template.role(role)) if kind == "text" else value, False)
            )

    for m in _fold_system(template, messages):
        trained = m["role"] == "assistant"
        header(m["role"])
        out.append(("content", m["content"], trained))
        out.append(("special", template.end_of_turn, trained))
        out.extend((kind, value, False) for kind, value in template.after_turn)
    if add_generation_prompt:
        header("assistant")
    return out


def render(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, str]],
    template: str | ChatTemplate = "chatml",
    *,
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """(ids, assistant mask) of `messages`; both lists have the same length. With `add_generation_prompt` the
    messages must end with a user turn (the generated assistant turn follows)."""
    check_messages(list(messages), last="user" if add_generation_prompt else None)
    if template == TOKENIZER:
        return _own_template(tokenizer)(list(messages), add_generation_prompt=add_generation_prompt)
    template = get_template(template) if isinstance(template, str) else template
    ids: list[int] = []
    mask: list[int] = []
    for kind, value, trained in _pieces(template, messages, add_generation_prompt):
        if kind == "bos":
            piece_ids = [tokenizer.bos_id]
        elif kind == "special":
            piece_ids = [special_id(tokenizer, value, template)]
        elif kind == "nl":
            piece_ids = _newlines(tokenizer, value)
        elif kind == "content":
            # User text: a marker typed in it stays text (module doc).
            piece_ids = tokenizer.encode_text(value) if value else []
        else:
            piece_ids = tokenizer.encode(value) if value else []
        ids.extend(piece_ids)
        mask.extend([int(trained)] * len(piece_ids))
    return ids, mask


def render_continuation(
    tokenizer: Tokenizer,
    prompt: Sequence[dict[str, str]],
    completion: Sequence[dict[str, str]],
    template: str | ChatTemplate = "chatml",
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask): `prompt` rendered with the generation prompt, and the tokens
    that `completion` (assistant messages) adds after it in the rendered conversation."""
    prompt_ids, _ = render(tokenizer, prompt, template, add_generation_prompt=True)
    ids, mask = render(tokenizer, [*prompt, *completion], template)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template does not render the prompt as the start of the conversation")
    return prompt_ids, ids[len(prompt_ids) :], mask[len(prompt_ids) :]


def render_text(
    messages: Sequence[dict[str, str]],
    template: str | ChatTemplate = "chatml",
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text (what Hugging Face's template of the same name renders)."""
    template = get_template(template) if isinstance(template, str) else template
    parts = []
    checked = check_messages(list(messages), last="user" if add_generation_prompt else None)
    for kind, value, _ in _pieces(template, checked, add_generation_prompt):
        parts.append(template.bos_text if kind == "bos" else "\n" * value if kind == "nl" else value)
    return "".join(parts)


def special_id(tokenizer: Tokenizer, piece: str, template: ChatTemplate | None = None) -> int:
    """The id of a chat marker; a tokenizer without it is a config error naming the marker."""
    try:
        return tokenizer.token_id(piece)
    except KeyError:
        name = f" of chat template {template.name!r}" if template else ""
        raise ConfigError(
            f"the tokenizer has no piece {piece!r}{name}; train it with the marker among its special tokens "
            "(tokenizer.CHAT_SPECIAL_TOKENS) or pick another data.chat_template"
        ) from None


def stop_ids(tokenizer: Tokenizer, template: str | ChatTemplate = "chatml") -> tuple[int, ...]:
    """Ids that end a sampled assistant turn: the template's end-of-turn marker and EOS (only EOS for the
    tokenizer's own template, whose EOS is its end of turn)."""
    if template == TOKENIZER:
        return (tokenizer.eos_id,)
    template = get_template(template) if isinstance(template, str) else template
    return special_id(tokenizer, template.end_of_turn, template), tokenizer.eos_id


def _newlines(tokenizer: Tokenizer, count: int) -> list[int]:
    try:
        return [tokenizer.token_id("\n")] * count
    except KeyError:
        return tokenizer.encode("\n" * count)
