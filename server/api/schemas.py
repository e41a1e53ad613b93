"""Request and response models of the training API.

`POST /train` takes four forms of example, told apart by their keys: `messages` (a
demonstration, OpenAI's fine-tuning form), `prompt` + `completion` (TRL's form: a
demonstration, or with `label` a thumbs up / down on that answer), and `input` +
`preferred_output` + `non_preferred_output` (OpenAI's DPO form: a preference pair). Each
becomes a `Lesson`: plain conversations the engine's tokenizer encodes.

Over 300 lines on purpose: every request and response model of the API in one place, as
FastAPI's layout keeps them; each model is short.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    model_validator,
)

from server.engine.records import State
from server.engine.tokenization import context_turns, preference_pair


def _unicode_text(text: str) -> str:
    """JSON may escape a lone surrogate (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode text: a lone surrogate at character {exc.start}"
                         ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode_text)]


class Message(BaseModel):
    """One chat turn; as in OpenAI's fine-tuning format, `weight` 0 excludes an assistant
    turn from the loss (default: assistant turns are targets, other turns never are)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text
    weight: Literal[0, 1] | None = None

    @model_validator(mode="after")
    def _weight_only_on_assistant(self) -> Message:
        if self.weight == 1 and self.role != "assistant":
            raise ValueError(f"weight 1 is only allowed on assistant messages, not {self.role}")
        return self

    @property
    def is_target(self) -> bool:
        return self.role == "assistant" and self.weight != 0


@dataclass
class Lesson:
    """What one example teaches, for the engine: `messages` is the conversation with its
    answer (the preferred one of a pair), `rejected` the same with the non-preferred answer.
    kind: demo (cross-entropy on the assistant targets), up / down (KTO on the last answer),
    pair (DPO)."""

    kind: Literal["demo", "up", "down", "pair"]
    messages: list[dict]
    rejected: list[dict] | None = None


def _plain(messages: list[Message]) -> list[dict]:
    return [m.model_dump(exclude_none=True) for m in messages]


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)

    def to_messages(self) -> list[dict]:
        """Plain dicts for the engine's tokenizer (it knows nothing of pydantic)."""
        return _plain(self.messages)

    def lesson(self) -> Lesson:
        return Lesson("demo", self.to_messages())

    @model_validator(mode="after")
    def _has_target(self) -> ChatExample:
        if not any(m.is_target for m in self.messages):
            raise ValueError("example has no target: at least one assistant message with "
                             "weight 1 (the default) is required")
        return self


def _context(messages: list[Message], name: str) -> list[dict]:
    """Turns before an answer: context only, never a target."""
    if not messages:
        raise ValueError(f"{name} has no message")
    if any(m.weight is not None for m in messages):
        raise ValueError(f"{name}: 'weight' is only used in the messages form")
    if messages[-1].role != "user":
        raise ValueError(f"{name} must end with a user message, not {messages[-1].role}")
    return context_turns(_plain(messages))


def _answer(answer: str | list[Message], name: str, blank_ok: bool = False) -> dict:
    """One answer: a string, or a list of exactly one assistant message; not empty (nor
    blank, but in a demonstration, where it always could be)."""
    if isinstance(answer, str):
        answer = [Message(role="assistant", content=answer)]
    if len(answer) != 1:
        raise ValueError(f"{name} must hold exactly one assistant message, not {len(answer)}")
    (m,) = answer
    if m.role != "assistant":
        raise ValueError(f"{name}: the answer's role must be assistant, not {m.role}")
    if m.weight is not None:
        raise ValueError(f"{name}: 'weight' is only used in the messages form")
    if not m.content or not (blank_ok or m.content.strip()):
        raise ValueError(f"{name}: the answer's content is {'blank' if m.content else 'empty'}")
    return {"role": "assistant", "content": m.content}


class PromptExample(BaseModel):
    """TRL's prompt-completion form (a string or a conversation each). Without `label`: a
    demonstration. With `label` (TRL's unpaired preference form): feedback on that answer,
    true a thumbs-up, false a thumbs-down; a thumbs-down with `preferred_completion` (the
    answer wanted) becomes a preference pair."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text | list[Message]
    completion: Text | list[Message]
    label: StrictBool | None = None
    preferred_completion: Text | list[Message] | None = None

    @model_validator(mode="after")
    def _check(self) -> PromptExample:
        self.lesson()
        return self

    def lesson(self) -> Lesson:
        prompt = [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) \
            else _context(self.prompt, "prompt")
        answer = _answer(self.completion, "completion", blank_ok=self.label is None)
        if self.preferred_completion is not None:
            if self.label is not False:
                raise ValueError("preferred_completion goes with label false (a thumbs-down "
                                 "on completion, and the answer wanted instead)")
            wanted = _answer(self.preferred_completion, "preferred_completion")
            if wanted["content"] == answer["content"]:
                raise ValueError("preferred_completion is the same answer as completion")
            return Lesson("pair", *preference_pair(prompt, wanted["content"],
                                                   answer["content"]))
        kind = "demo" if self.label is None else "up" if self.label else "down"
        return Lesson(kind, prompt + [answer])

    def to_chat(self) -> ChatExample:
        """The demonstration as a chat (only without `label`: feedback is no chat)."""
        if self.label is not None:
            raise ValueError("a labeled example is feedback on an answer, not a demonstration")
        return ChatExample(messages=self.lesson().messages)


class PreferenceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)


class PreferenceExample(BaseModel):
    """OpenAI's DPO fine-tuning form: the conversation so far, the answer preferred and the
    one not (one assistant message each)."""

    model_config = ConfigDict(extra="forbid")
    input: PreferenceInput
    preferred_output: list[Message]
    non_preferred_output: list[Message]

    @model_validator(mode="after")
    def _check(self) -> PreferenceExample:
        self.lesson()
        return self

    def lesson(self) -> Lesson:
        context = _context(self.input.messages, "input.messages")
        wanted = _answer(self.preferred_output, "preferred_output")
        other = _answer(self.non_preferred_output, "non_preferred_output")
        if wanted["content"] == other["content"]:
            raise ValueError("preferred_output and non_preferred_output are the same answer")
        return Lesson("pair", *preference_pair(context, wanted["content"], other["content"]))


def _form(value: Any) -> str:
    """Which form an example is in, by its keys (so a 422 names that form's problem)."""
    if isinstance(value, dict):
        if "messages" in value:
            return "messages"
        if {"input", "preferred_output", "non_preferred_output"} & value.keys():
            return "preference"
        return "prompt"
    return {ChatExample: "messages", PreferenceExample: "preference"}.get(type(value),
                                                                          "prompt")


Example = Annotated[Annotated[ChatExample, Tag("messages")]
                    | Annotated[PreferenceExample, Tag("preference")]
                    | Annotated[PromptExample, Tag("prompt")], Discriminator(_form)]
TrainRequest = Annotated[Annotated[Example, Tag("example")]
                         | Annotated[list[Example], Tag("list")],
                         Discriminator(lambda v: "list" if isinstance(v, list) else "example")]


class TrainResponse(BaseModel):
    ids: list[str]
    queued: int


class DriftState(BaseModel):
    """Drift of the live model from the reference, on a window of probes."""

    mean_kl: float  # per probe answer token, nats
    max_kl: float
    changed_share: float  # probes whose greedy answer changed
    probes: int
    # mean KL per token from where the batch started (measured when --drift-budget is set;
    # the gate judges this one)
    batch_kl: float | None = None


class ExampleState(BaseModel):
    id: str
    state: State
    # what it teaches: demo, pair (DPO), up / down (KTO); None if not known (restored
    # from an example log written before kinds were recorded)
    kind: Literal["demo", "pair", "up", "down"] | None = None
    step: int | None = None
    reason: str | None = None  # why it failed, or how it was trained
    drift: DriftState | None = None  # measured after its batch


class Health(BaseModel):
    status: Literal["ok"]


class CheckpointResult(BaseModel):
    """One sync of the live weights into the model's files (docs/checkpoint.md)."""

    tensors: int
    chunks: int
    bytes_written: int
    journal_bytes: int
    seconds: float
    optimizer_step: int
    at: float  # Unix time
    version: int | None = None  # the version it made (None: nothing had changed)
    bytes_changed: int = 0
    history_bytes: int = 0  # its undo record in the history store
    whole_files: int = 0  # files written whole and renamed in


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Literal["last-checkpoint", "original"] | Annotated[int, Field(ge=0)]


class RollbackResult(BaseModel):
    """A live rollback (docs/checkpoint.md#live-rollback)."""

    version: int  # what the live weights are now
    weight_version: int  # the live weight version after it
    chunks: int
    bytes_read: int
    stall_seconds: float  # serving held off (the writes into vLLM's tensors)
    seconds: float
    examples_rolled_back: int
    examples_restored: int  # trained examples the target version holds again
    at: float


class VersionInfo(BaseModel):
    model_config = ConfigDict(extra="allow")  # what else the version records
    n: int
    time: float
    reachable: bool  # its bytes are kept: rollback and revert can reach it
    name: str | None = None  # "original"
    examples: int | None = None
    optimizer_steps: int | None = None
    drift: DriftState | None = None
    bytes_changed: int | None = None
    history_bytes: int | None = None
    parent: int | None = None


class VersionsList(BaseModel):
    head: int  # the version the model's files hold
    weight_version: int  # the live weight version
    weight_checkpoint: int | None  # the version the live weights equal, if any
    versions: list[VersionInfo]
    history: dict | None  # retention (keep, budget, keep_original); None: no undo records
    history_bytes: int  # disk the history store uses


class DriftRebased(BaseModel):
    probes: int  # answered by the live model: the new reference


class Memory(BaseModel):
    parameters: int
    parameters_in_vllm_memory: int  # by storage pointer
    weight_bytes: int
    uss_bytes: int  # this process's unique memory


class ServingLoadState(BaseModel):
    """vLLM's load as the trainer reads it from the worker's record (no HTTP)."""

    busy: bool  # an engine step is running or ended less than 0.25 s ago
    engine_steps: int
    engine_steps_per_second: float  # over the last ~2 s
    busy_share: float  # share of that time inside engine steps
    tokens_per_second: float
    requests: int  # in the latest engine step
    seconds_since_step: float | None
    lock_wait_seconds: float  # engine steps' total wait for the trainer's writes


class PacingState(BaseModel):
    """How the trainer paced itself around serving (--train-share)."""

    train_share: float
    share_above: int  # requests at once up to which a busy chunk owes no wait
    max_wait_seconds: float  # per optimizer step (--train-max-wait)
    threads_busy: int  # torch threads of a chunk while serving is busy (0: unchanged)
    waited_seconds: float  # total time the trainer waited for serving
    waits: int  # chunks of training work it delayed
    capped_waits: int  # waits cut short by --train-max-wait
    chunks: int
    busy_chunks: int  # chunks that overlapped serving
    busy_train_seconds: float  # their time
    light_chunks: int  # of them, those that owed no wait (--train-share-above)
    last_seen: ServingLoadState | None  # the load it saw at its latest chunk


class Status(BaseModel):
    optimizer_steps: int
    last_loss: float | None
    # the drift reference and the guard are still being made or loaded: batches wait for them
    preparing: bool = False
    examples_queued: int
    examples_trained: int
    examples_failed: int
    skipped_steps: int
    trained_tokens: int
    model_path: str
    applied_steps: int = 0
    last_step_seconds: float | None = None
    last_write_seconds: float | None = None
    serving_stall_seconds: float = 0.0  # time the trainer held the write lock
    vllm_waited_seconds: float = 0.0  # time vLLM's engine steps waited for it (vLLM's clock)
    vllm_unlocked_steps: int = 0  # engine steps run without the lock (a writer held it too long)
    last_checkpoint: CheckpointResult | None = None
    checkpointing_disabled: str | None = None  # why no checkpoint can be written, if so
    drift: DriftState | None = None  # after the last batch that changed weights
    drift_budget: float | None = None
    pinned_probes: list[str] = []  # probes whose answers are kept exactly (until taught)
    kept_probes: list[str] = []  # probes whose greedy answers are restored (until taught)
    undone_batches: int = 0
    learned_without_steps: int = 0  # examples the model already answered as taught
    weight_version: int = 0  # bumped by every change of the live weights
    weight_checkpoint: int | None = None  # the checkpoint version they equal, if any
    last_rollback: RollbackResult | None = None
    pacing: PacingState | None = None
    serving_load: ServingLoadState | None = None  # now; None: no vLLM load record
