"""The live weight version: which weights answer now.

Bumped by every change of the live weights (an applied optimizer step, a batch the drift gate
undid, a rollback), and named by the checkpoint version the weights equal, when they equal one
(after a checkpoint, after a rollback, at start before any step). With vLLM it lives in the
export's shared counter ``weights.counter`` (layout: hooks/contract.py), which vLLM's response
header reads (hooks/version_header.py); the trainer is its only writer, inside the write
window, so an engine step never sees new weights under an old version.
"""

from __future__ import annotations

from weight_mapping import pack_weight_version, unpack_weight_version


class WeightVersion:
    def __init__(self, counter=None):
        """`counter`: the export's shared counter (hooks.consistency.UpdateCounter); None
        keeps the version in this process."""
        self._counter = counter
        self._raw = 0

    def get(self) -> tuple[int, int | None]:
        """(version, the checkpoint the live weights equal or None)."""
        return unpack_weight_version(self._counter.read() if self._counter else self._raw)

    def _set(self, version: int, checkpoint: int | None) -> None:
        raw = pack_weight_version(version, checkpoint)
        if self._counter is None:
            self._raw = raw
        else:
            self._counter.add(raw - self._counter.read())

    def bump(self, checkpoint: int | None = None) -> None:
        """The live weights changed; they now equal checkpoint `checkpoint` (or none)."""
        self._set(self.get()[0] + 1, checkpoint)

    def name(self, checkpoint: int | None) -> None:
        """The live weights (unchanged) equal checkpoint `checkpoint`."""
        self._set(self.get()[0], checkpoint)

    def label(self) -> str:
        version, checkpoint = self.get()
        return f"{version}" if checkpoint is None else f"{version} (checkpoint {checkpoint})"
