"""Diff-based, crash-safe write-back of the live weights into the model's safetensors files."""

from checkpoint.journal import recover
from checkpoint.layout import LayoutError, read_layout
from checkpoint.sync import Checkpointer, SyncResult, chunk_checksums

__all__ = ["Checkpointer", "LayoutError", "SyncResult", "chunk_checksums", "read_layout",
           "recover"]
