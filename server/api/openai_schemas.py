"""The OpenAI files and fine-tuning objects, requests and errors, as the official client reads
them (field names and types from OpenAI's API reference; the client's own types parse them).

Training-file lines are checked with the models /train uses, so a line is valid in a file
exactly when it would be valid as a /train example; preference pairs have OpenAI's DPO form.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.api.schemas import ChatExample, PreferenceExample, PreferenceInput, PromptExample
from server.engine.tokenization import ExampleError, check_limits

T = TypeVar("T")
Auto = Literal["auto"]


class OpenAIError(Exception):
    """Answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = \
            status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


# --- training-file lines ---
def _no_tools(tools: list[Any] | None) -> list[Any] | None:
    if tools:
        raise ValueError("tools are not supported (the trainer learns text turns only)")
    return tools


class ChatLine(ChatExample):
    """A chat example as OpenAI's fine-tuning files hold it; tools are not supported."""

    tools: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    _tools = field_validator("tools")(_no_tools)


class PreferenceLineInput(PreferenceInput):
    tools: list[Any] | None = None
    parallel_tool_calls: bool | None = None
    _tools = field_validator("tools")(_no_tools)


class PreferenceLine(PreferenceExample):
    """OpenAI's DPO form, checked exactly as /train checks a pair (its input may name the
    tools fields of OpenAI's files, empty)."""

    input: PreferenceLineInput


def _reason(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"])
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"{where + ': ' if where else ''}{msg}{more}"


def line_validator(max_messages: int, max_chars: int):
    """A training-file line -> its kind ("supervised" or "dpo"), or ValueError naming the
    problem. The cheap per-example limits of /train apply; token limits are checked when a
    job validates the file (they need the tokenizer)."""

    def validate(raw: bytes) -> str:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"not UTF-8 text (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        try:
            if "messages" in obj:
                chat = ChatLine.model_validate(obj)
                kind, messages = "supervised", chat.to_messages()
            elif "prompt" in obj or "completion" in obj:
                example = PromptExample.model_validate(obj)
                if example.label is not None or not isinstance(example.prompt, str) or \
                        not isinstance(example.completion, str):
                    raise ValueError("a prompt-completion line is a demonstration: a prompt "
                                     "and a completion string, no label")
                kind, messages = "supervised", example.to_chat().to_messages()
            elif {"input", "preferred_output", "non_preferred_output"} & obj.keys():
                pair = PreferenceLine.model_validate(obj).lesson()
                check_limits(pair.rejected, max_messages, max_chars)  # /train checks both
                kind, messages = "dpo", pair.messages
            else:
                raise ValueError('expected "messages" (chat), "prompt" and "completion", or '
                                 '"input", "preferred_output" and "non_preferred_output" '
                                 "(preference pair)")
            check_limits(messages, max_messages, max_chars)
        except ValidationError as exc:
            raise ValueError(_reason(exc)) from None
        except ExampleError as exc:
            raise ValueError(str(exc)) from None
        return kind

    return validate


# --- requests ---
class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: Auto | Annotated[int, Field(ge=1)] | None = None
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] | None = None
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] | None = None


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class MethodIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them
    method: MethodIn | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, Field(max_length=64)] | None = None
    validation_file: str | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: Annotated[dict[str, str], Field(max_length=16)] | None = None


# --- responses ---
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    batch_size: int
    learning_rate_multiplier: float
    n_epochs: int


class DpoJobHyperparameters(JobHyperparameters):
    beta: float


class MethodOut(BaseModel):
    type: Literal["supervised", "dpo"]
    supervised: dict[str, JobHyperparameters] | None = None
    dpo: dict[str, DpoJobHyperparameters] | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str = "vllm-apollo"
    result_files: list[str] = []
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed",
                    "cancelled"]
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: MethodOut | None = None
    user_provided_suffix: str | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] | None = None


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def page(items: list, after: str | None, limit: int, what: str) -> dict:
    """Cursor pagination as OpenAI's lists do: the `limit` items after the one with id
    `after` (in the list's order), and whether more follow."""
    start = 0
    if after is not None:
        ids = [x.id for x in items]
        if after not in ids:
            raise OpenAIError(400, f"no {what} with id {after!r} to page after", "after")
        start = ids.index(after) + 1
    chosen = items[start:start + limit]
    return {"data": chosen, "has_more": start + limit < len(items),
            "first_id": chosen[0].id if chosen else None,
            "last_id": chosen[-1].id if chosen else None}
