"""Diff-based, crash-safe write-back of the live weights into the model's safetensors files."""

from checkpoint.guard import CheckpointRefused
from checkpoint.history import HistoryError
from checkpoint.journal import JournalError
from checkpoint.layout import LayoutError, read_layout
from checkpoint.preflight import checkpoint_blockers
from checkpoint.recovery import recover
from checkpoint.retention import Retention
from checkpoint.sync import Checkpointer, SyncResult, chunk_checksums

__all__ = ["CheckpointRefused", "Checkpointer", "HistoryError", "JournalError", "LayoutError",
           "Retention", "SyncResult", "checkpoint_blockers", "chunk_checksums", "read_layout",
           "recover"]
