"""Request and response models of the training API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from server.engine.records import State


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


class ChatExample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)

    def to_messages(self) -> list[dict]:
        """Plain dicts for the engine's tokenizer (it knows nothing of pydantic)."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    @model_validator(mode="after")
    def _has_target(self) -> ChatExample:
        if not any(m.is_target for m in self.messages):
            raise ValueError("example has no target: at least one assistant message with "
                             "weight 1 (the default) is required")
        return self


class PromptExample(BaseModel):
    """Rendered as a one-turn chat (user: prompt, assistant: completion) by the chat template."""

    model_config = ConfigDict(extra="forbid")
    prompt: Text
    completion: Text = Field(min_length=1)

    def to_chat(self) -> ChatExample:
        return ChatExample(messages=[Message(role="user", content=self.prompt),
                                     Message(role="assistant", content=self.completion)])


Example = Annotated[ChatExample | PromptExample, Field(union_mode="left_to_right")]
TrainRequest = Example | list[Example]


class TrainResponse(BaseModel):
    ids: list[str]
    queued: int


class DriftState(BaseModel):
    """Drift of the live model from the reference, on a window of probes."""

    mean_kl: float  # per probe answer token, nats
    max_kl: float
    changed_share: float  # probes whose greedy answer changed
    probes: int


class ExampleState(BaseModel):
    id: str
    state: State
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


class Status(BaseModel):
    optimizer_steps: int
    last_loss: float | None
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
    undone_batches: int = 0
    learned_without_steps: int = 0  # examples the model already answered as taught
    weight_version: int = 0  # bumped by every change of the live weights
    weight_checkpoint: int | None = None  # the checkpoint version they equal, if any
    last_rollback: RollbackResult | None = None
