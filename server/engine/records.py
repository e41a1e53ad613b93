"""What the trainer knows of each example and of itself: records, counters, queue errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server.engine.tokenization import Encoded

State = Literal["queued", "trained", "failed", "cancelled", "rolled back"]  # rolled back:
# trained, then taken out of the live weights by a rollback to a version without it


@dataclass
class Record:
    id: str
    encoded: Encoded | None  # dropped once the example is finished
    state: State = "queued"
    kind: str | None = None  # what it teaches (tokenization.Kind); None: not recorded
    step: int | None = None
    reason: str | None = None  # why it failed, or how it was trained
    drift: dict | None = None  # the drift measured after its batch
    loss: float | None = None  # its batch's loss when the batch ended
    # Examples of one group (a fine-tuning job) are trained in batches of their own, at the
    # base learning rate times `lr_scale` and with the preference loss's `beta` (None: the
    # server's --beta); live examples have no group.
    group: str | None = None
    lr_scale: float = 1.0
    beta: float | None = None
    stop: bool = False  # its batch stops at the next step boundary (a cancelled job)


@dataclass
class TrainerStats:
    optimizer_steps: int = 0
    last_loss: float | None = None
    accepted: int = 0
    trained: int = 0
    failed: int = 0
    trained_tokens: int = 0
    train_seconds: float = 0.0
    last_step_seconds: float | None = None
    last_write_seconds: float | None = None
    stall_seconds: float = 0.0  # total time vLLM's engine steps were excluded by writes
    undone_batches: int = 0  # batches the drift gate undid
    learned_without_steps: int = 0  # examples the model already answered as taught


class QueueFull(RuntimeError):
    def __init__(self, queued: int, limit: int, unit: str = "examples"):
        super().__init__(f"training queue is full ({queued} of {limit} {unit} queued); retry "
                         "later")


class Unavailable(RuntimeError):
    """The trainer cannot take examples any more; the message says why."""
