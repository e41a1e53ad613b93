"""Turn chat examples into token ids and loss labels with the served model's chat template.

The conversation is rendered once as text; each assistant target's span is found by rendering
the prefixes before and after it, and tokens whose characters fall in a target span get
labels. So the model learns exactly the text vLLM's chat endpoint would have generated there
(the assistant header is prompt, the turn's end-of-turn token is target).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IGNORE_INDEX = -100


class ExampleError(ValueError):
    """An example that cannot be trained; the message names the problem."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if tokenizer.chat_template is None:  # plain concatenation for base models
        text = "".join(m["content"] for m in messages)
        return text
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def is_target(message: Mapping) -> bool:
    """Assistant turns are targets unless their `weight` is 0 (OpenAI's fine-tuning format)."""
    return message["role"] == "assistant" and message.get("weight") != 0


def encode(messages: Sequence[Mapping], tokenizer, max_tokens: int) -> Encoded:
    """`messages`: dicts with role, content and optionally weight (0 or 1)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    full = _render(tokenizer, msgs, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if not is_target(message):
            continue
        start_text = _render(tokenizer, msgs[:i], add_generation_prompt=True) if i else ""
        end_text = _render(tokenizer, msgs[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise ExampleError(f"messages[{i}]: the chat template does not render this "
                               "conversation incrementally; cannot locate the target")
        spans.append((len(start_text), len(end_text)))

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) > max_tokens:
        raise ExampleError(f"example has {len(ids)} tokens, more than the limit of "
                           f"{max_tokens} (--max-tokens-per-example)")
    labels = [IGNORE_INDEX] * len(ids)
    for t, (lo, hi) in enumerate(offsets):
        if hi > lo and any(s <= lo < e for s, e in spans):
            labels[t] = ids[t]
    # Causal LM: the label at t is predicted from tokens < t; the first token has no context.
    labels[0] = IGNORE_INDEX
    out = Encoded(input_ids=list(ids), labels=labels)
    if out.num_targets == 0:
        raise ExampleError("example has no target token (assistant content is empty?)")
    return out
