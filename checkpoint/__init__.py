"""Diff-based, crash-safe write-back of the live weights into the model's safetensors files."""
