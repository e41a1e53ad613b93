"""What keeps a lesson from changing what it should not: the probe monitor (reference, drift
after each batch, the distillation guard) and the batch's pre-image that undoes it.

The pre-image is a host-memory copy of every trainable tensor (and of the optimizer's state)
taken before a batch's first step; undoing writes it back in place, bit for bit, under the
same lock as an optimizer step. No second copy lives in accelerator memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from checkpoint.durable import atomic_replace
from server.engine import drift
from server.engine.drift import Drift, Reference
from server.engine.loss import collate, leads
from server.engine.nullspace import NullSpaceGuard
from server.engine.pacing import Pace
from server.engine.tokenization import IGNORE_INDEX, Encoded

log = logging.getLogger("vllm_apollo.drift")
ASKED = 0.99  # a probe this similar to a batch's prompt asks the batch's own question
# A kept answer's token must lead the runner-up by this many nats (log-probability), so that
# vLLM's kernels, which round otherwise than the trainer's, answer the same; by half its lead
# when kept where that was less.
KEEP_MARGIN = 0.01


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class PreImage:
    """The trainable weights and the optimizer state as they were before a batch."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._saved = [_local(p).detach().to("cpu", copy=True) for p in self._params]
        self._state = copy.deepcopy(optimizer.state_dict())
        self._optimizer = optimizer

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        """Call inside the write window: the weights become the pre-image again."""
        for p, saved in zip(self._params, self._saved, strict=True):
            _local(p).copy_(saved, non_blocking=False)
        self._optimizer.load_state_dict(self._state)


class Monitor:
    """The probe set, its reference and the rotation of probes measured after each batch."""

    def __init__(self, tokenizer, probe_file: str | None, store: Path | None, *,
                 per_batch: int, pad_id: int, shared: Path | None = None,
                 null_space_eps: float | None = None, bases_on_device: bool = False):
        """`store`: where this server keeps its reference (beside the example log).
        `shared`: a cache of references made from the model's files as they are on disk, for
        servers that start while the live weights still equal the files."""
        probes = drift.load_probes(probe_file)
        self.prompts = drift.prompt_ids(tokenizer, probes)
        self.protected = [i for i, p in enumerate(probes) if p.protect]
        self.pinned = [i for i, p in enumerate(probes) if p.pin]
        self.keep = [i for i, p in enumerate(probes) if p.keep]
        # the kept probes not yet released: answer and leads (replaced whole: read by /status)
        self.kept_held: dict[int, tuple[list[int], list[float]]] = {}
        self.questions = [p.messages[-1]["content"] for p in probes]
        self.pins_held: frozenset[int] = frozenset()  # replaced whole: read by /status
        self.neighbours = drift.Neighbours(self.prompts)
        self.store, self.per_batch, self.pad_id = store, per_batch, pad_id
        self.shared = shared
        self.null_space_eps, self.bases_on_device = null_space_eps, bases_on_device
        self.guard: NullSpaceGuard | None = None
        self.stop_ids = {t for t in (tokenizer.eos_token_id,
                                     tokenizer.convert_tokens_to_ids("<|im_end|>"))
                         if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id}
        self.reference: Reference | None = None
        self.last: Drift | None = None
        self._turn = 0
        self._guard_turn = 0

    def ensure_reference(self, model: nn.Module,
                         pace: Pace = contextlib.nullcontext) -> Reference:
        """Load the stored reference (a restart keeps it), or answer the probes now, each
        batch of them in a `pace()` chunk; and the kept probes' whole answers it lacks."""
        if self.reference is None:
            made = self._reference(model, pace)
            if self._answer_whole(model, pace):  # pinned or kept since it was made
                self._save(self.store)
                if made:  # the live weights are still the files'
                    self._save(self.shared)
            self._hold_kept()
        return self.reference

    def _reference(self, model: nn.Module, pace: Pace) -> bool:
        """Sets `self.reference`; true if loaded from the shared cache or made now."""
        digest = drift.digest_of(self.prompts)
        if self.store is not None and self.store.exists():
            ref = Reference.load(self.store)
            if ref.digest == digest:
                self.reference = ref
                log.info("drift reference: %d probes from %s", len(ref), self.store)
                return False
            log.warning("the probe set changed since %s was made: answering it again",
                        self.store)
        if self.shared is not None and self.shared.exists():
            ref = Reference.load(self.shared)
            if ref.digest == digest:
                self.reference = ref
                self._save(self.store)
                log.info("drift reference: %d probes from %s", len(ref), self.shared)
                return True
        self.rebase(model, pace)
        self._save(self.shared)
        return True

    def _answer_whole(self, model: nn.Module, pace: Pace) -> bool:
        """The whole greedy answer of each pinned or kept probe the reference does not have
        yet, as the live model gives it now; true if any was made."""
        ref = self.reference
        missing = [i for i in sorted({*self.pinned, *self.keep})
                   if self._digest(i) not in ref.whole]
        if not missing:
            return False
        answered = self._answer([self.prompts[i] for i in missing], model, pace,
                                tokens=drift.PINNED_TOKENS)
        for j, i in enumerate(missing):
            top = answered.top_logp[j]
            ref.whole[self._digest(i)] = (answered.answers[j], (top[:, 0] - top[:, 1]).tolist())
        return True

    def _hold_kept(self) -> None:
        released = self._released_record()
        self.kept_held = {i: self.reference.whole[self._digest(i)] for i in self.keep
                          if self._digest(i) not in released}

    def _save(self, path: Path | None) -> None:
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.reference.save(path)
        except OSError as exc:  # a read-only model directory: only the cache is lost
            log.warning("could not keep the drift reference at %s: %s", path, exc)

    def ensure_guard(self, model: nn.Module, pace: Pace = contextlib.nullcontext) -> None:
        """Fit the null-space guard (if configured) on the probes' inputs, once."""
        if self.null_space_eps is None or (self.guard is not None and self.guard.fitted):
            return
        ref = self.ensure_reference(model, pace)
        self.guard = NullSpaceGuard(model, self.null_space_eps, self.bases_on_device)
        paths = [p.with_name(p.name.replace("probe-reference", "null-guard"))
                 for p in (self.store, self.shared) if p is not None]
        tag = f"{ref.digest}:{drift.digest_of([ref.prompts[i] for i in self.protected])}" \
            f":{drift.digest_of([ref.prompts[i] for i in self.pinned])}:{drift.PINNED_TOKENS}"
        for at, path in enumerate(paths):
            try:
                if path.exists() and self.guard.load(path, tag, pace):
                    # the paths tried before held none or bases fitted otherwise
                    self._save_guard(paths[:at] + [p for p in paths[at + 1:]
                                                   if not p.exists()], tag, source=path)
                    self._release(self._released())
                    return
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                log.warning("ignoring the guard's bases in %s: %s", path, exc)
        self.guard.fit(model, [ref.prompts[i] + ref.answers[i] for i in self.protected],
                       self.pad_id, pace=pace, pinned=self._pinned_sequences())
        self._save_guard(paths, tag)  # replacing bases fitted otherwise: the next start loads
        self._release(self._released())

    def _pinned_sequences(self) -> dict[str, list[int]]:
        """Each pinned probe with its whole answer (the reference keeps it)."""
        return {str(i): self.prompts[i] + self.reference.whole[self._digest(i)][0]
                for i in self.pinned}

    def release(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """A batch asking a pinned or kept probe's very question teaches its answer: that
        probe stops being pinned or kept, from now on (recorded by prompt beside the
        reference, so a restart, or an edited probe file, does not hold it again). Returns
        the probes released."""
        held = self.pins_held | set(self.kept_held)
        if not held:  # nothing pinned or kept, nothing to score
            return []
        scores = self.neighbours.scores(prompts)
        asked = [i for i in sorted(held) if scores[i] >= ASKED]
        if asked:
            if pins := [i for i in asked if i in self.pins_held]:
                self._release(pins)
            self.kept_held = {i: a for i, a in self.kept_held.items() if i not in asked}
            if self.store is not None:
                try:
                    kept = sorted(self._released_record() | {self._digest(i) for i in asked})
                    atomic_replace(self._released_path(), [json.dumps(kept).encode()])
                except OSError as exc:
                    log.warning("could not keep the released probes: %s", exc)
            log.info("pinned or kept probe(s) %s asked by a batch: their answers may now "
                     "change", [self.questions[i] for i in asked])
        return asked

    def _digest(self, i: int) -> str:
        return drift.digest_of([self.prompts[i]])

    def _released_path(self) -> Path:
        return self.store.with_name("pins-released.json")

    def _released_record(self) -> set[str]:
        """The prompts of the pinned or kept probes batches asked before (a damaged record:
        none)."""
        path = self._released_path() if self.store is not None else None
        if path is None or not path.exists():
            return set()
        try:
            digests = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            return set()
        if not (isinstance(digests, list) and all(isinstance(d, str) for d in digests)):
            log.warning("ignoring %s: not a list of probe digests", path)
            return set()
        return set(digests)

    def _released(self) -> list[int]:
        """The pinned probes a batch asked before (this server's record)."""
        record = self._released_record()
        return [i for i in self.pinned if self._digest(i) in record]

    def _release(self, probes: Sequence[int]) -> None:
        for i in probes:
            self.guard.release(str(i))
        self.pins_held = frozenset(int(i) for i in self.guard.pins())

    def pinned_questions(self) -> list[str]:
        """The pinned probes whose answers are still kept exactly."""
        return [self.questions[i] for i in sorted(self.pins_held)]

    def kept_questions(self) -> list[str]:
        """The kept probes whose greedy answers are still restored."""
        return [self.questions[i] for i in sorted(self.kept_held)]

    def unkept(self, model: nn.Module) -> tuple[list[int], torch.Tensor | None]:
        """The kept probes whose answers the live model no longer gives (somewhere another
        token is the greedy choice, or the answer's own token leads by less than KEEP_MARGIN
        nats, or half its lead when kept if that was less); and, from the same forward pass,
        the loss that brings them back: a hinge on their tokens short of that margin plus
        KEEP_MARGIN, so only those tokens pull and the step changes as little else as it can
        (None when none moved)."""
        held = sorted(self.kept_held)
        if not held:
            return [], None
        short = self._shortfall(model, held)
        moved = (short.detach() > 0).any(-1)
        if not moved.any():
            return [], None
        return ([i for i, m in zip(held, moved.tolist(), strict=True) if m],
                (short[moved] + KEEP_MARGIN).clamp_min(0).sum(-1).mean())

    def _shortfall(self, model: nn.Module, probes: list[int]) -> torch.Tensor:
        """Per kept probe and position: how far its answer's token falls short of leading
        by its margin (<= 0 where it does, and off the answer)."""
        rows, needs = [], []
        for i in probes:
            answer, lead = self.kept_held[i]
            rows.append(Encoded(self.prompts[i] + answer,
                                [IGNORE_INDEX] * len(self.prompts[i]) + answer))
            needs.append([min(KEEP_MARGIN, x / 2) for x in lead])
        device = next(model.parameters()).device
        ids, labels, mask = collate(rows, self.pad_id, device)
        lead, is_target = leads(model(input_ids=ids, attention_mask=mask).logits, labels)
        need = torch.zeros(lead.shape, device=device)
        for k, (i, n) in enumerate(zip(probes, needs, strict=True)):
            at = len(self.prompts[i]) - 1  # the answer's first token, shifted
            need[k, at:at + len(n)] = torch.tensor(n, device=device)
        return torch.where(is_target, need - lead, torch.zeros_like(lead))

    def _save_guard(self, paths: list[Path], tag: str, source: Path | None = None) -> None:
        """Keep the bases at each of `paths`, replacing what is there: a hard link to the
        `source` they were loaded from where one can be made (a file is replaced whole,
        never rewritten in place, so a link keeps what it was), else written again (~110 MB
        for the default model)."""
        for path in paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                if source is not None and _link(source, path):
                    continue
                self.guard.save(path, tag)
            except OSError as exc:
                log.warning("could not keep the guard's bases at %s: %s", path, exc)

    def rebase(self, model: nn.Module, pace: Pace = contextlib.nullcontext) -> None:
        """The live model's answers become the reference (an explicit request, or the first
        start)."""
        self.reference = self._answer(self.prompts, model, pace)
        self._answer_whole(model, pace)
        self._hold_kept()
        self.last = None
        self._save(self.store)
        log.info("drift reference: %d probes answered (%d tokens each at most)",
                 len(self.reference), drift.ANSWER_TOKENS)

    def _answer(self, prompts: list[list[int]], model: nn.Module, pace: Pace,
                tokens: int | None = None) -> Reference:
        """Greedy answers as the served model gives them (eval mode: no dropout)."""
        model_was_training = model.training
        model.eval()
        try:
            return drift.build_reference(model, prompts, pad_id=self.pad_id,
                                         stop_ids=self.stop_ids, tokens=tokens, pace=pace)
        finally:
            model.train(model_was_training)

    def window(self, near: Sequence[Sequence[int]] = ()) -> list[int]:
        """The probes a batch with prompts `near` is judged on: half of them the nearest to
        those prompts, the rest the next window of the rotation. A probe that asks what the
        batch asks is left out: an answer taught to its very question is the lesson itself
        (the name lesson and the name probe), not drift."""
        n = len(self.prompts)
        scores = self.neighbours.scores(near) if near else [0.0] * n
        asked = {i for i, s in enumerate(scores) if s >= ASKED}
        nearest = [i for i in sorted(range(n), key=lambda i: -scores[i])
                   if 0 < scores[i] < ASKED][:self.per_batch // 2]
        rest = [i for i in drift.rotation(n, self.per_batch, self._turn)
                if i not in asked and i not in nearest]
        self._turn += 1
        return nearest + rest[:self.per_batch - len(nearest)]

    def snapshot(self, model: nn.Module, window: list[int]) -> drift.Snapshot:
        """The window's answers as the batch finds them (the gate judges what it adds)."""
        return drift.snapshot(model, self.ensure_reference(model), window, pad_id=self.pad_id)

    def measure(self, model: nn.Module, window: list[int],
                since: drift.Snapshot | None = None) -> Drift:
        """Drift on `window` from the reference (and from `since`, where given)."""
        self.last = drift.measure(model, self.ensure_reference(model), window,
                                  pad_id=self.pad_id, since=since)
        return self.last

    def guard_loss(self, model: nn.Module, probes: int) -> torch.Tensor:
        """Mean KL(reference ‖ live) on the next `probes` probes, with gradients."""
        ref = self.ensure_reference(model)
        window = drift.rotation(len(ref), probes, self._guard_turn)
        self._guard_turn += 1
        kl, _ = drift.probe_kl(model, ref, window, pad_id=self.pad_id)
        return kl.mean()


def _link(source: Path, path: Path) -> bool:
    """Make `path` a hard link to `source` (replacing it); False where links cannot be made
    (another file system, or not allowed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
