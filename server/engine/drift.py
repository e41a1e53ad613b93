"""How far the live model has moved from where it started, on prompts nobody taught it.

A probe set (shipped: data/probes.jsonl, 230 prompts in ten categories; or the user's own)
is answered once, greedily, by the model as first served: the reference keeps each probe's
first ANSWER_TOKENS answer tokens and, at each of them, the TOP_K most likely tokens and
their log-probabilities. Drift at any later moment is the teacher-forced KL(reference ‖
live) per answer token over those k tokens plus one bucket for the rest of the vocabulary
(a lower bound of the full KL), and the share of probes whose greedy answer changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from checkpoint.durable import atomic_replace

if TYPE_CHECKING:
    from server.engine.pacing import Pace

ANSWER_TOKENS = 12
PINNED_TOKENS = 128  # a pinned or kept probe's answer is kept whole (up to this many tokens)
TOP_K = 16
DEFAULT_PROBES = Path(__file__).with_name("data") / "probes.jsonl"


@dataclass
class Probe:
    messages: list[dict]
    protect: bool = True  # the null-space guard keeps it; False: measured, not protected
    pin: bool = False  # the guard keeps its exact inputs: its answer stays until taught
    keep: bool = False  # its greedy answer is restored after any batch that changes it


def load_probes(path: str | Path | None = None) -> list[Probe]:
    """Probes from JSONL: {"messages": [...]} or {"prompt": "..."} per line, and optionally
    "protect": false (measured, not protected: a behaviour users are expected to change),
    "pin": true (its inputs kept exactly, so its answer stays until a lesson asks its very
    question) or "keep": true (its greedy answer kept, by training on it where a batch
    changed it, until a lesson asks its very question)."""
    probes = []
    for n, line in enumerate(Path(path or DEFAULT_PROBES).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            messages = item["messages"] if "messages" in item else \
                [{"role": "user", "content": item["prompt"]}]
            if not (messages and all(isinstance(m["content"], str) for m in messages)):
                raise ValueError("no messages")
            protect, pin = item.get("protect", True) is not False, item.get("pin", False)
            keep = item.get("keep", False)
            if not isinstance(pin, bool) or not isinstance(keep, bool):
                raise ValueError('"pin" and "keep" must be true or false')
            if pin and not protect:
                raise ValueError('"pin": true with "protect": false')
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: line {n}: not a probe ({exc})") from None
        probes.append(Probe([{"role": m["role"], "content": m["content"]} for m in messages],
                            protect=protect, pin=pin, keep=keep))
    if not probes:
        raise ValueError(f"{path}: no probes")
    return probes


@dataclass
class Reference:
    """The model's answers to the probes when it was first served."""

    prompts: list[list[int]]
    answers: list[list[int]]
    top_ids: list[torch.Tensor]  # per probe: (answer tokens, TOP_K) token ids
    top_logp: list[torch.Tensor]  # ... and their log-probabilities
    digest: str  # of the probe prompts: a reference only fits the probes it was made for
    # The pinned and kept probes, by digest_of([prompt]): the whole greedy answer (up to
    # PINNED_TOKENS) and by how much each of its tokens led the runner-up (nats); made with
    # the reference, or when a probe is first pinned or kept.
    whole: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def save(self, path: Path) -> None:
        save_atomic(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> Reference:
        saved = torch.load(path, weights_only=True)
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def save_atomic(obj: object, path: Path) -> None:
    """torch.save through one atomic replace: a full disk raises OSError (torch's own file
    writer raises RuntimeError) and leaves neither `path` changed nor a partial file."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_replace(path, [buf.getbuffer()], durable=False)


def prompt_ids(tokenizer, probes: Sequence[Probe]) -> list[list[int]]:
    out = []
    for probe in probes:
        messages = probe.messages
        if tokenizer.chat_template is None:
            text = "".join(m["content"] for m in messages)
        else:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def digest_of(prompts: list[list[int]]) -> str:
    """Identifies what a reference answers: the probe prompts and how they are answered."""
    key = json.dumps([ANSWER_TOKENS, TOP_K, prompts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def build_reference(model: nn.Module, prompts: list[list[int]], *, pad_id: int,
                    stop_ids: set[int], batch: int = 32, tokens: int | None = None,
                    pace: Pace = contextlib.nullcontext) -> Reference:
    """Greedy answers (up to `tokens`, default ANSWER_TOKENS, ending at a stop token) and
    their top-k.
    `pace()`: the context each batch of prompts runs in (the trainer's pacing chunk).
    Batched by length: padding is computed too.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows: dict[int, tuple] = {}  # prompt index -> (answer, top ids, top log-probs)
    for lo in range(0, len(order), batch):
        with pace():
            done = _answer(model, [prompts[i] for i in order[lo:lo + batch]], pad_id, stop_ids,
                           tokens or ANSWER_TOKENS)
        rows.update(zip(order[lo:lo + batch], done, strict=True))
    ordered = [rows[i] for i in range(len(prompts))]
    return Reference(prompts, [r[0] for r in ordered], [r[1] for r in ordered],
                     [r[2] for r in ordered], digest_of(prompts))


def _answer(model: nn.Module, chunk: list[list[int]], pad_id: int, stop_ids: set[int],
            tokens: int) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """One batch of build_reference: each prompt's answer, top ids and top log-probs."""
    device = next(model.parameters()).device
    width = max(map(len, chunk))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
    mask = (torch.arange(width, device=device) >= torch.tensor(
        [width - len(p) for p in chunk], device=device)[:, None]).long()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=tokens, pad_token_id=pad_id,
                         eos_token_id=sorted(stop_ids) or None, output_logits=True,
                         return_dict_in_generate=True)
    logp = torch.stack(out.logits, 1).float().log_softmax(-1)  # (b, new, vocab)
    values, indices = logp.topk(TOP_K, dim=-1)
    rows = []
    for i in range(len(chunk)):
        new = out.sequences[i, width:].tolist()
        n = next((j + 1 for j, t in enumerate(new) if t in stop_ids), len(new))
        rows.append((new[:n], indices[i, :n].cpu(), values[i, :n].cpu()))
    return rows


@dataclass
class Drift:
    """Drift of the live model from the reference on some probes."""

    mean_kl: float  # per answer token, nats
    max_kl: float  # the largest per-token KL
    changed: float  # share of probes whose greedy answer changed
    probes: int
    batch_kl: float | None = None  # mean KL per token from where the batch started

    def as_dict(self) -> dict:
        return {"mean_kl": self.mean_kl, "max_kl": self.max_kl,
                "changed_share": self.changed, "probes": self.probes,
                "batch_kl": self.batch_kl}


def _kl_terms(live_logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor
              ) -> torch.Tensor:
    """Per-token KL(ref ‖ live) over the reference's top-k tokens plus one 'rest' bucket."""
    q = live_logp.gather(-1, top_ids)
    p = top_logp.exp()
    rest_p = (1 - p.sum(-1)).clamp_min(0)
    rest_q = (1 - q.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (top_logp - q)).sum(-1)
    return kl + torch.where(rest_p > 0, rest_p * (rest_p.clamp_min(1e-12).log() - rest_q.log()),
                            0.0)


def _answer_logp(model: nn.Module, ref: Reference, indices: Sequence[int], *, pad_id: int
                 ) -> list[torch.Tensor]:
    """Per probe, the live log-probabilities at its answer positions, teacher-forced on the
    reference's answer (differentiable)."""
    device = next(model.parameters()).device
    seqs = [ref.prompts[i] + ref.answers[i] for i in indices]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    mask = (torch.arange(width, device=device) < torch.tensor(
        [len(s) for s in seqs], device=device)[:, None]).long()
    logits = model(input_ids=ids, attention_mask=mask).logits
    out = []
    for row, i in enumerate(indices):
        start, n = len(ref.prompts[i]) - 1, len(ref.answers[i])
        out.append(logits[row, start:start + n].float().log_softmax(-1))
    return out


def probe_kl(model: nn.Module, ref: Reference, indices: Sequence[int], *, pad_id: int
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher-forced KL per answer token for probes `indices` (differentiable: the guard
    uses it as a loss) and, per probe, the live greedy tokens at its answer positions."""
    device = next(model.parameters()).device
    logps = _answer_logp(model, ref, indices, pad_id=pad_id)
    kls = [_kl_terms(lp, ref.top_ids[i].to(device), ref.top_logp[i].to(device))
           for lp, i in zip(logps, indices, strict=True)]
    return torch.cat(kls), [lp.argmax(-1) for lp in logps]


Snapshot = dict[int, tuple[torch.Tensor, torch.Tensor]]  # probe -> (top ids, their logp)


@torch.no_grad()
def snapshot(model: nn.Module, ref: Reference, indices: Sequence[int], *, pad_id: int,
             batch: int = 32) -> Snapshot:
    """The live model's top-k at the reference answers' positions for probes `indices`:
    where a batch starts from, so its own drift can be told from the drift before it."""
    out: Snapshot = {}
    for lo in range(0, len(indices), batch):
        part = list(indices[lo:lo + batch])
        for i, lp in zip(part, _answer_logp(model, ref, part, pad_id=pad_id), strict=True):
            top = lp.topk(min(TOP_K, lp.shape[-1]), dim=-1)
            out[i] = (top.indices.cpu(), top.values.cpu())
    return out


@torch.no_grad()
def measure(model: nn.Module, ref: Reference, indices: Sequence[int], *, pad_id: int,
            batch: int = 32, since: Snapshot | None = None) -> Drift:
    """Drift from the reference on probes `indices`; with `since` (a snapshot of the same
    probes), also the KL from that snapshot: the drift of what happened since."""
    kls, since_kls, changed = [], [], 0
    for lo in range(0, len(indices), batch):
        part = list(indices[lo:lo + batch])
        for i, lp in zip(part, _answer_logp(model, ref, part, pad_id=pad_id), strict=True):
            device = lp.device
            kls.append(_kl_terms(lp, ref.top_ids[i].to(device), ref.top_logp[i].to(device)))
            changed += lp.argmax(-1).tolist() != ref.answers[i]
            if since is not None:
                ids, logp = since[i]
                since_kls.append(_kl_terms(lp, ids.to(device), logp.to(device)))
    kl = torch.cat(kls)
    return Drift(mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                 changed=changed / max(len(indices), 1), probes=len(indices),
                 batch_kl=float(torch.cat(since_kls).mean()) if since_kls else None)


def rotation(n: int, size: int, turn: int) -> list[int]:
    """The `turn`-th window of `size` probes out of `n`, wrapping around, in one fixed
    shuffled order: probe files are grouped by topic (the shipped one by category), and a
    window in file order would judge a batch on one topic."""
    size = min(size, n)
    order = list(range(n))
    random.Random(n).shuffle(order)
    start = (turn * size) % n
    return [order[(start + j) % n] for j in range(size)]


class Neighbours:
    """The probes whose prompts share the most rare tokens with a batch's prompts (TF-IDF
    cosine over token ids: the chat template and common words weigh ~nothing), so a batch
    is judged where it is most likely to have moved the model, not only on a random window."""

    def __init__(self, prompts: Sequence[Sequence[int]]):
        df = Counter(t for p in prompts for t in set(p))
        self.idf = {t: math.log(len(prompts) / c) for t, c in df.items()}
        self.rare = math.log(len(prompts) + 1)  # a token no probe has
        self.vectors = [self._vector(p) for p in prompts]

    def _vector(self, ids: Sequence[int]) -> dict[int, float]:
        v = {t: c * self.idf.get(t, self.rare) for t, c in Counter(ids).items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items() if x}

    def scores(self, prompts: Sequence[Sequence[int]]) -> list[float]:
        """Per probe, its cosine similarity to the most similar of `prompts` (1: the same)."""
        queries = [self._vector(p) for p in prompts]
        return [max((sum(x * v.get(t, 0.0) for t, x in q.items()) for q in queries),
                    default=0.0) for v in self.vectors]


def is_finite(d: Drift) -> bool:
    return all(math.isfinite(v) for v in (d.mean_kl, d.max_kl))
