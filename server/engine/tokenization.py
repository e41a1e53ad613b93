"""Turn chat examples into token ids and loss labels with the served model's chat template.

Cost is linear in the example's size: the cheap limits (messages, characters) are checked
before any template runs, and the template runs twice per example, whatever the number of
turns: once with a unique marker around every message's content (where each message lies in
the text) and once as vLLM's chat endpoint renders it, which must equal the first without
its markers. A target is an assistant message's content plus the end-of-turn special token
right after it: exactly what vLLM's chat endpoint would generate there (the assistant header
is prompt; generation stops at the end-of-turn token).
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

IGNORE_INDEX = -100
# What an example teaches: a demonstration (its targets, cross-entropy), feedback on one
# answer (thumbs up / down, KTO), or a preference pair (DPO): the preferred answer's tokens in
# the example itself, the non-preferred one's in `rejected`.
Kind = Literal["demo", "up", "down", "pair"]
KINDS = ("demo", "up", "down", "pair")


class ExampleError(ValueError):
    """An example that cannot be trained; the message names the problem."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    kind: Kind = "demo"
    rejected: Encoded | None = None  # kind "pair": the non-preferred answer

    @property
    def num_targets(self) -> int:
        own = sum(label != IGNORE_INDEX for label in self.labels)
        return own + (self.rejected.num_targets if self.rejected is not None else 0)

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens it is not trained on: the prompt (and turns of weight 0)."""
        return [t for t, label in zip(self.input_ids, self.labels, strict=True)
                if label == IGNORE_INDEX]

    @property
    def tokens(self) -> int:
        """Every token it puts through the model (both answers of a pair)."""
        return len(self.input_ids) + (self.rejected.tokens if self.rejected is not None else 0)


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def is_target(message: Mapping) -> bool:
    """Assistant turns are targets unless their `weight` is 0 (OpenAI's fine-tuning format)."""
    return message["role"] == "assistant" and message.get("weight") != 0


@functools.lru_cache(maxsize=8)
def _end_of_turn(tokenizer) -> re.Pattern | None:
    """Whitespace, then one of the tokenizer's special tokens (<|im_end|>, <|eot_id|>, ...)."""
    specials = sorted({str(t) for t in tokenizer.all_special_tokens if str(t)}, key=len,
                      reverse=True)
    return re.compile(r"\s*(?:" + "|".join(map(re.escape, specials)) + ")") if specials \
        else None


def _spans(tokenizer, msgs: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and each message's content span in it."""
    nonce = "apollo" + secrets.token_hex(8)  # 64 random bits: no content holds it by chance
    if any(nonce in m["content"] for m in msgs):
        raise ExampleError("a message holds the tokenizer's marker")
    marked = _render(tokenizer, [{**m, "content": f"{nonce}b{j}n{m['content']}{nonce}e{j}n"}
                                 for j, m in enumerate(msgs)])
    text, spans, at = [], [], 0
    found = [(x.start(), x.end(), x[1], int(x[2]))
             for x in re.finditer(re.escape(nonce) + r"([be])(\d+)n", marked)]
    expected = [(kind, j) for j in range(len(msgs)) for kind in "be"]
    if [(kind, j) for _, _, kind, j in found] != expected:
        raise ExampleError("the chat template does not render every message's content once, "
                           "in order; cannot locate the targets")
    length = 0
    for (start, end, kind, j), nxt in zip(found, found[1:] + [(len(marked),) * 2 + ("", 0)],
                                          strict=True):
        text.append(marked[at:start])
        length += start - at
        if kind == "b":
            spans.append((length, length + nxt[0] - end))
        elif marked[found[2 * j][1]:start] != msgs[j]["content"]:
            raise ExampleError(f"messages[{j}]: the chat template does not render this "
                               "content verbatim (it trims or rewrites it); cannot locate the "
                               "targets")
        at = end
    text.append(marked[at:])
    full = "".join(text)
    if full != _render(tokenizer, msgs):
        raise ExampleError("the chat template renders this conversation differently once its "
                           "content is marked; cannot locate the targets")
    return full, spans


def check_limits(messages: Sequence[Mapping], max_messages: int | None,
                 max_chars: int | None) -> None:
    """The cheap limits, before any template or tokenizer runs (None: not checked)."""
    if max_messages is not None and len(messages) > max_messages:
        raise ExampleError(f"example has {len(messages)} messages, more than the limit of "
                           f"{max_messages} (--max-messages-per-example)")
    chars = sum(len(m["content"]) for m in messages)
    if max_chars is not None and chars > max_chars:
        raise ExampleError(f"example has {chars} characters of content, more than the limit "
                           f"of {max_chars} (--max-chars-per-example)")


def encode(messages: Sequence[Mapping], tokenizer, max_tokens: int, *,
           max_messages: int | None = None, max_chars: int | None = None,
           end_of_turn: bool = True) -> Encoded:
    """`messages`: dicts with role, content and optionally weight (0 or 1). The HTTP layer
    passes the cheap limits from its settings (--max-messages-per-example, ...).
    `end_of_turn=False`: the targets are the content alone (a thumbs-down judges an answer's
    text; one vLLM cut at max_tokens never had its end-of-turn token)."""
    check_limits(messages, max_messages, max_chars)
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokenizer.chat_template is None:  # plain concatenation for base models
        full, spans, at = "".join(m["content"] for m in msgs), [], 0
        for m in msgs:
            spans.append((at, at + len(m["content"])))
            at += len(m["content"])
    else:
        full, spans = _spans(tokenizer, msgs)
    eot = _end_of_turn(tokenizer) if tokenizer.chat_template is not None else None
    targets = []
    for message, (lo, hi) in zip(messages, spans, strict=True):
        if is_target(message):
            m = eot.match(full, hi) if eot is not None and end_of_turn else None
            targets.append((lo, m.end() if m else hi))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        raise ExampleError("example renders to no token")
    if len(ids) > max_tokens:
        raise ExampleError(f"example has {len(ids)} tokens, more than the limit of "
                           f"{max_tokens} (--max-tokens-per-example)")
    labels = [IGNORE_INDEX] * len(ids)
    k = 0  # targets and tokens are both in text order: one pass
    for t, (lo, hi) in enumerate(offsets):
        while k < len(targets) and targets[k][1] <= lo:
            k += 1
        if k < len(targets) and hi > lo and targets[k][0] <= lo:
            labels[t] = ids[t]
    # Causal LM: the label at t is predicted from tokens < t; the first token has no context.
    labels[0] = IGNORE_INDEX
    out = Encoded(input_ids=list(ids), labels=labels)
    if out.num_targets == 0:
        raise ExampleError("example has no target token (assistant content is empty?)")
    return out


def context_turns(messages: Sequence[Mapping]) -> list[dict]:
    """Turns before an answer, as `encode` takes them: context only, so an assistant turn
    among them is weighted 0."""
    return [{"role": m["role"], "content": m["content"],
             **({"weight": 0} if m["role"] == "assistant" else {})} for m in messages]


def preference_pair(context: Sequence[Mapping], preferred: str, rejected: str
                    ) -> tuple[list[dict], list[dict]]:
    """OpenAI's DPO form (a context, the preferred and the non-preferred answer) as the two
    conversations `encode_lesson("pair", ...)` takes; /train and fine-tuning jobs both build
    pairs here, so a pair encodes the same whichever way it came."""
    turns = context_turns(context)
    return (turns + [{"role": "assistant", "content": preferred}],
            turns + [{"role": "assistant", "content": rejected}])


def encode_lesson(kind: Kind, messages: Sequence[Mapping], tokenizer, max_tokens: int, *,
                  rejected: Sequence[Mapping] | None = None, **limits) -> Encoded:
    """One example of any kind; the limits apply to each conversation of a pair. A
    thumbs-down's targets are its answer's text (no end-of-turn token: see `encode`)."""
    out = encode(messages, tokenizer, max_tokens, end_of_turn=kind != "down", **limits)
    out.kind = kind
    if kind == "pair":
        if rejected is None:
            raise ExampleError("a preference pair needs its non-preferred answer")
        out.rejected = encode(rejected, tokenizer, max_tokens, **limits)
        if out.rejected.input_ids == out.input_ids:
            raise ExampleError("the preferred and non-preferred answers encode to the same "
                               "tokens")
    return out
