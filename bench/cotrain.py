"""Co-training beside a server, side by side on Llama-3-8B shapes: what training the served
weights costs when the trainer keeps its own copy and syncs it (torch AdamW, as weight-sync
trainers beside vLLM do) and when it trains the served tensors in place (APOLLO-Mini,
standard and layer-wise), on batches of one size (a fresh random sequence each step) and the
same trained parameters.

    python -m bench.cotrain --device cuda --logdir DIR [--layers N] [--tokens T]
    python -m bench.cotrain --device cpu                # tiny shapes: the kit's dry run

A stand-in owner process (`python -m bench.cotrain owner ...`, started by this one) builds
random bf16 weights directly on the device in vLLM's fused layout and exports them through
hooks/export.py, as vLLM's worker would; this process maps them (weight_mapping.attach).
Memory is this process's torch.cuda.max_memory_allocated above what it held before a row:
the served weights live in the owner and are mapped here without being allocated here, so
every row counts exactly what training adds to them (a trainer copy included). Each row
runs guarded: an error (an OOM) is reported in its row and the next row still runs.
bench/gpu_check.py runs this as one step of the GPU kit.

Over 300 lines on purpose: the bench and its stand-in owner are one program the GPU kit copies
and runs as a unit, and its rows are only comparable when set up by the same code side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hooks.export import export_parameters
from server.engine.coordination import VllmCoordinator
from server.engine.loss import causal_lm_loss, collate
from server.engine.nullspace import NullSpaceGuard
from server.engine.objective import Objective, Weights
from server.engine.records import TrainerStats
from server.engine.steps import Stepper
from server.engine.tokenization import IGNORE_INDEX, Encoded
from server.engine.wiring import make_optimizer
from server.settings import Settings
from weight_mapping import attach, build_model, fuse_state_dict, shares_storage
from weight_mapping.mapping import parameters_on_meta

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # Llama-3-8B; and small enough for the CPU dry run
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, bos_token_id=128000,
               eos_token_id=128001),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, bos_token_id=1,
                 eos_token_id=2),
}
GUARD_PROBES, GUARD_PROBE_TOKENS = 230, 40  # about the shipped probe set's size
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[cotrain {time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:.1f}s] {msg}",
          flush=True)


def llama_config(size: str, layers: int) -> LlamaConfig:
    return LlamaConfig(architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                       rms_norm_eps=1e-5, max_position_embeddings=131072,
                       tie_word_embeddings=False,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                        "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192},
                       **SIZES[size])


def meta_model(config) -> nn.Module:
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config)


def trained(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What both sides train: the decoder layers' matrices (as the server does under its
    default null-space guard: embeddings, LM head and norms stay as they are)."""
    return [(n, p) for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n]


# --- the stand-in owner: served weights built on the device, exported --------------------

def owner_main(model_dir: str, export_dir: str, device: str, dtype: str) -> None:
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(model_dir)
    shapes = fuse_state_dict(dict(meta_model(config).named_parameters()), config)
    g = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, m in shapes.items():
        t = torch.ones if m.dim() == 1 else torch.randn
        tensors[name] = t(m.shape, device=device, dtype=getattr(torch, dtype),
                          **({} if m.dim() == 1 else {"generator": g}))
        if m.dim() > 1:
            tensors[name].mul_(0.02)
    export_parameters(tensors, export_dir, model_path=model_dir)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"ready {time.perf_counter() - t0:.2f} {nbytes}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "sum":
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            print(repr(tensors[args[0]].double().sum().item()), flush=True)
        elif cmd == "quit":
            break


class Owner:
    """The owner in a child process (a real second process, as vLLM's worker is); its
    "sum NAME" answers say whether a write reached its tensors."""

    def __init__(self, model_dir: Path, export_dir: Path, device: str, dtype: str, log_path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.cotrain", "owner", str(model_dir), str(export_dir),
             device, dtype], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(log_path, "w"), text=True, cwd=ROOT)
        line = self.proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            raise RuntimeError(f"the owner failed to start: {line!r} (log: {log_path})")
        self.build_seconds, self.nbytes = float(line[1]), int(line[2])

    def tensor_sum(self, name: str) -> float:
        self.proc.stdin.write(f"sum {name}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(60)


# --- the modes --------------------------------------------------------------------------

class Clock:
    """Time spent inside regions of a step (the in-place write, the sync): CUDA events on a
    GPU (no host sync inside the step), the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    @contextlib.contextmanager
    def region(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            yield
            end.record()
            self.marks.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.marks.append(time.perf_counter() - t0)

    def take_ms(self) -> float | None:
        """Milliseconds in regions since the last call (after a device sync)."""
        if not self.marks:
            return None
        ms = sum(s.elapsed_time(e) for s, e in self.marks) if self.cuda else \
            1e3 * sum(self.marks)
        self.marks = []
        return ms


@dataclass
class Ctx:
    """What every mode shares: the export, the batches, the settings. Every step trains a
    fresh random sequence (as live training sees new examples): on one repeated batch the
    first mode memorises it, and the next modes, on the same served weights, would start at
    loss ~0 (the learn-then-stop check then refuses to step at all)."""

    export: object
    config: object
    coordinator: VllmCoordinator
    tokens: int
    gen: torch.Generator
    device: torch.device
    settings: Settings
    guard_layers: int

    def fresh(self) -> Encoded:
        """A new random sequence; its second half is the target."""
        ids = torch.randint(0, self.config.vocab_size, (self.tokens,), generator=self.gen)
        ids = ids.tolist()
        return Encoded(ids, [IGNORE_INDEX] * (self.tokens // 2) + ids[self.tokens // 2:])

    def batch(self):
        return collate([self.fresh()], 0, self.device)


class Mode:
    """One way to train; step() runs one optimizer step (returning its own seconds where it
    measures them itself), check() says whether it did what it should."""

    reset_peak_after_setup = False

    def __init__(self, ctx: Ctx):
        self.ctx, self.clock = ctx, Clock(ctx.device)
        self.loss: torch.Tensor | None = None
        self.opt = None

    def take_write_ms(self) -> float | None:
        """The in-place write's (or sync's) milliseconds since the last call."""
        return self.clock.take_ms()

    def plain_loss(self) -> torch.Tensor:
        ids, labels, mask = self.ctx.batch()
        self.loss = causal_lm_loss(self.model, ids, labels, mask)
        return self.loss

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for s in self.opt.state.values()
                   for v in s.values() if torch.is_tensor(v) and v.dim() > 0)

    def check(self) -> tuple[bool, str]:
        loss = None if self.loss is None else float(self.loss.detach())
        ok = loss is not None and math.isfinite(loss)
        return ok, f"loss {loss:.3f}" if loss is not None else "no loss"


class AdamWCopy(Mode):
    """A separate trainer copy of the whole model (bf16), torch AdamW (fused) on it, then the
    weight sync: every trained tensor copied into the owner's tensors (one foreach copy
    through the mapped memory, under the write window: the fastest a sync can be)."""

    def __init__(self, ctx: Ctx):
        super().__init__(ctx)
        self.model = build_model(ctx.export.tensors, ctx.config)
        served = {n: p.detach() for n, p in self.model.named_parameters()}
        names = {n for n, _ in trained(self.model)}
        for module in self.model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None:
                    module._parameters[key] = nn.Parameter(p.detach().clone(),
                                                           requires_grad=False)
        mine = dict(self.model.named_parameters())
        for n in names:
            mine[n].requires_grad_(True)
        self.pairs = [(served[n], mine[n]) for n in sorted(names)]
        params = [mine[n] for n in sorted(names)]
        try:
            self.opt = torch.optim.AdamW(params, lr=ctx.settings.lr, fused=True)
            self.fused = True
        except RuntimeError:  # no fused kernel for this device
            self.opt = torch.optim.AdamW(params, lr=ctx.settings.lr, foreach=True)
            self.fused = False

    def step(self) -> None:
        self.plain_loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with self.clock.region(), self.ctx.coordinator.write():
            torch._foreach_copy_([d for d, _ in self.pairs], [s for _, s in self.pairs])
            self.ctx.coordinator.step_applied()

    def check(self) -> tuple[bool, str]:
        ok, text = super().check()
        same = all(torch.equal(d, s) for d, s in self.pairs)
        return ok and same, f"{text}; served {'==' if same else '!='} trainer copy" + (
            "" if self.fused else " (foreach: no fused AdamW here)")


class InPlace(Mode):
    """Ours: the model's parameters are views of the owner's tensors; APOLLO-Mini as the
    server configures it (server.engine.wiring.make_optimizer) writes into them."""

    def __init__(self, ctx: Ctx, layerwise: bool = False, learned_check: bool = False,
                 guard: str | None = None):
        super().__init__(ctx)
        self.model = build_model(ctx.export.tensors, ctx.config)
        self.opt = make_optimizer(self.model, ctx.settings)
        self.layerwise = layerwise
        self.handles = self.opt.layerwise(write_guard=self._param_window) if layerwise \
            else []
        self.learned_check = learned_check
        self.note = ""
        if guard is not None:
            self._fit_guard(ctx.guard_layers, on_device=guard == "device")

    @contextlib.contextmanager
    def _param_window(self) -> Iterator[None]:
        with self.clock.region(), self.ctx.coordinator.write():
            yield

    def _fit_guard(self, layers: int, on_device: bool) -> None:
        """The null-space guard (as the server sets it up: the matrices it trains), fitted on
        the first decoder layer on random token sequences about the size of the shipped probe
        set (no tokenizer or probes at these shapes; on a random-init model the inputs are
        near isotropic, so the bases are near full rank: the guard's most expensive case),
        and the fitted projectors copied to the first `layers` layers (a fit per layer, 32
        eigendecompositions of 14336-wide covariances, would not fit the device time)."""
        self.reset_peak_after_setup = True  # the fit's covariances are not a step's memory
        trained = [m.weight for m in self.model.modules()
                   if isinstance(m, nn.Linear) and m.weight.requires_grad]
        first = NullSpaceGuard(self.model, self.ctx.settings.guard_eps, on_device=True)
        first.layers = {n: m for n, m in first.layers.items()
                        if n.startswith("model.layers.0.")}
        g = torch.Generator().manual_seed(1)
        vocab = self.ctx.config.vocab_size
        seqs = torch.randint(0, vocab, (GUARD_PROBES, GUARD_PROBE_TOKENS), generator=g).tolist()
        t0 = time.perf_counter()
        first.fit(self.model, seqs, pad_id=0)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        fit_s = time.perf_counter() - t0
        first.remove()
        self.guard = NullSpaceGuard(self.model, self.ctx.settings.guard_eps, on_device)
        self.guard.layers = {n: m for n, m in self.guard.layers.items()
                             if any(n.startswith(f"model.layers.{i}.") for i in range(layers))}
        key_of, projectors = {}, {}
        for name in self.guard.layers:
            i = name.split(".")[2]
            key = first.key_of[name.replace(f"layers.{i}.", "layers.0.", 1)]
            key_of[name] = key.replace("layers.0.", f"layers.{i}.", 1)
            if key_of[name] not in projectors:
                projectors[key_of[name]] = copy.copy(first.projectors[key])
                projectors[key_of[name]].held = first.projectors[key].held.to("cpu")
        free(self.ctx.device)
        held = torch.cuda.memory_allocated() if self.ctx.device.type == "cuda" else 0
        self.guard._install(key_of, projectors)
        held = (torch.cuda.memory_allocated() - held) if self.ctx.device.type == "cuda" else 0
        kept = sum(p.rank for p in projectors.values()) / sum(p.dim for p in projectors.values())
        pinned = any(p.staging is not None for p in projectors.values())
        size = sum(p.held.numel() * p.held.element_size() for p in projectors.values())
        self.note = (f"{len(self.guard.layers)} of {len(trained)} trained matrices guarded; "
                     f"fitted on layer 0 in {fit_s:.1f} s on {GUARD_PROBES} x "
                     f"{GUARD_PROBE_TOKENS} random tokens, {kept:.0%} of input directions "
                     f"protected; projectors {size / 2**30:.2f} GiB "
                     f"{'in pinned host memory' if pinned else 'on the device'}, "
                     f"{held / 2**30:.2f} GiB of device memory held between steps")

    def step(self) -> None:
        if self.learned_check:  # the learn-then-stop check, as the server runs it per batch
            objective = Objective([self.ctx.fresh()], 0, self.ctx.device,
                                  Weights.of(self.ctx.settings))
            self.loss, done = objective(self.model)
        else:
            self.plain_loss()
        self.loss.backward()
        if self.layerwise:  # stepped during backward
            self.ctx.coordinator.step_applied()
        else:
            ok = self.opt.prepare()
            if ok is None or not bool(ok):  # as the server: a bad step never takes the lock
                raise RuntimeError("the step was skipped (non-finite gradient)")
            with self.clock.region(), self.ctx.coordinator.write():
                self.opt.apply()
                self.ctx.coordinator.step_applied()
        self.opt.zero_grad(set_to_none=True)

    def check(self) -> tuple[bool, str]:
        ok, text = super().check()
        views = all(shares_storage(p, self.ctx.export.tensors) for p in self.model.parameters())
        return ok and views, f"{text}; {'all views' if views else 'NOT all views'} of the " \
            "owner's tensors" + (f"; {self.note}" if self.note else "")

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if getattr(self, "guard", None) is not None:
            self.guard.remove()


class ServerStep(Mode):
    """The server's own step (server.engine.steps.Stepper): the learn-then-stop check, the
    write windows (layer-wise: one per parameter, each ending in a device sync), the stats."""

    def __init__(self, ctx: Ctx, layerwise: bool):
        super().__init__(ctx)
        self.model = build_model(ctx.export.tensors, ctx.config)
        mode = "layerwise" if layerwise else "standard"
        settings = Settings(export_dir=ctx.settings.export_dir, optimizer_mode=mode,
                            drift_probes=0)
        self.opt = make_optimizer(self.model, settings)
        self.stats = TrainerStats()
        self.stepper = Stepper(self.model, self.opt, settings, pad_id=0,
                               coordinator=ctx.coordinator, stats=self.stats)

    def step(self) -> float:
        outcome = self.stepper.run([self.ctx.fresh()], 1)  # one step (then one more forward)
        if outcome.failed or outcome.steps != 1:
            raise RuntimeError(f"the server's step failed: {outcome.failed or outcome.note}")
        self.loss = torch.tensor(outcome.loss)
        return self.stats.last_step_seconds

    def take_write_ms(self) -> float | None:
        return 1e3 * self.stats.last_write_seconds


# --- measuring ----------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    step_ms: float | None = None
    write_ms: float | None = None
    peak: int | None = None  # bytes above what this process held before the row
    state: int | None = None
    check: str = ""
    ok: bool = False
    error: str | None = None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(name: str, make: Callable[[], Mode], ctx: Ctx, owner: Owner, watch: list[str],
            warmup: int, steps: int) -> Row:
    row, mode, cuda = Row(name), None, ctx.device.type == "cuda"
    log(f"{name}: setting up")
    free(ctx.device)
    base = torch.cuda.memory_allocated() if cuda else 0
    before = {n: owner.tensor_sum(n) for n in watch}
    try:
        mode = make()
        if cuda and mode.reset_peak_after_setup:
            torch.cuda.reset_peak_memory_stats()
        log(f"{name}: set up; {warmup} warm-up steps")
        for _ in range(warmup):
            mode.step()
        if cuda:
            torch.cuda.synchronize()
        mode.take_write_ms()
        times, writes = [], []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            own = mode.step()
            if cuda:
                torch.cuda.synchronize()
            times.append(own if own is not None else time.perf_counter() - t0)
            if (w := mode.take_write_ms()) is not None:
                writes.append(w)
        row.step_ms = 1e3 * statistics.median(times)
        row.write_ms = statistics.median(writes) if writes else None
        if cuda:
            row.peak = torch.cuda.max_memory_allocated() - base
        row.state = mode.state_bytes()
        row.ok, row.check = mode.check()
        seen = sum(owner.tensor_sum(n) != before[n] for n in watch)
        row.ok = row.ok and seen == len(watch)
        row.check += f"; owner saw {seen}/{len(watch)} change"
    except Exception as exc:  # the row says what failed; the next row still runs
        row.error = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        traceback.print_exc(file=sys.stdout)
    finally:
        if mode is not None and hasattr(mode, "close"):
            with contextlib.suppress(Exception):
                mode.close()
        del mode
        free(ctx.device)
    log(f"{name}: " + (f"error: {row.error}" if row.error else
                       f"{row.step_ms:.1f} ms/step, peak {gib(row.peak)}, {row.check}"))
    return row


def gib(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**30:.2f} GiB"


def ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.3f}x" if x is not None and base else "-"


def tables(main: list[Row], extra: list[Row | str]) -> str:
    base = main[0] if main else Row("none")
    out = ["| mode | step ms | write ms (serving excluded) | peak above served weights "
           "| vs AdamW memory | vs AdamW time | optimizer state | check |",
           "|---|---|---|---|---|---|---|---|"]
    for r in main:
        if r.error:
            out.append(f"| {r.name} | error: {r.error} | | | | | | FAIL |")
            continue
        write = f"{r.write_ms:.2f}" if r.write_ms is not None else "-"
        out.append(f"| {r.name} | {r.step_ms:.1f} | {write} | {gib(r.peak)} | "
                   f"{ratio(r.peak, base.peak)} | {ratio(r.step_ms, base.step_ms)} | "
                   f"{gib(r.state) if r.state is not None else '-'} | "
                   f"{'ok' if r.ok else 'FAIL'}: {r.check} |")
    if extra:
        ref = next((r for r in main if r.name.startswith("ours APOLLO-Mini, standard")), None)
        out += ["", "| ours, with the server's checks | step ms | vs ours standard | "
                "peak above served weights | check |", "|---|---|---|---|---|"]
        for r in extra:
            if isinstance(r, str):
                out.append(r)
            elif r.error:
                out.append(f"| {r.name} | n/a: {r.error} | | | |")
            else:
                delta = f"{r.step_ms - ref.step_ms:+.1f} ms" if ref and ref.step_ms else "-"
                out.append(f"| {r.name} | {r.step_ms:.1f} | {delta} | {gib(r.peak)} | "
                           f"{'ok' if r.ok else 'FAIL'}: {r.check} |")
    return "\n".join(out)


def arithmetic(config, tokens: int, card: int | None) -> tuple[int, list[str]]:
    """Bytes the AdamW baseline needs on the device (estimate), and the lines saying so."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for _, p in trained(model))
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    act = tokens * config.num_hidden_layers * (8 * h + 4 * i) * 2 + tokens * v * 14
    parts = {"served weights (bf16, the owner)": 2 * total,
             "trainer copy (bf16)": 2 * total, "gradients of the trained (bf16)": 2 * train,
             "AdamW moments, fp32 (2 x 4 B per trained param)": 8 * train,
             "activations + logits (estimate)": act}
    need = sum(parts.values())
    lines = [f"AdamW baseline on {config.num_hidden_layers} layers: {total / 1e9:.3f} B params, "
             f"{train / 1e9:.3f} B trained (decoder matrices); no fp32 master copy"]
    lines += [f"  {k}: {n / 2**30:.1f} GiB" for k, n in parts.items()]
    lines.append(f"  = {need / 2**30:.1f} GiB" + (f" of the card's {card / 2**30:.1f} GiB"
                                                 if card else ""))
    lines.append(f"  (torch's AdamW keeps its moments in the parameters' dtype, bf16: "
                 f"{4 * train / 2**30:.1f} GiB less than counted here)")
    return need, lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--logdir", default="/tmp/cotrain")
    ap.add_argument("--size", choices=sorted(SIZES), default=None,
                    help="8b on a GPU, tiny on the CPU")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: on a GPU the most of 32, 16, 8 whose AdamW "
                         "baseline fits in 80%% of the card; tiny: 2)")
    ap.add_argument("--tokens", type=int, default=None, help="one sequence of T tokens "
                    "(default 512; tiny: 64); the second half are the targets")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--guard-layers", type=int, default=None,
                    help="layers the null-space guard is installed on (default: all)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows to run (default all): adamw, standard, "
                         "layerwise, check, server, server-layerwise, guard-host, guard-device")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="optional rows start only before this many seconds have passed "
                         "(default on a GPU 200, so the step ends within 4 minutes; CPU: no "
                         "limit, the dry run runs every row)")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    size = a.size or ("8b" if cuda else "tiny")
    tokens = a.tokens or (512 if size == "8b" else 64)
    dtype = "bfloat16" if cuda else "float32"
    logdir = Path(a.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_properties(device).total_memory if cuda else None
    budget = a.budget_s if a.budget_s is not None else 200.0 if cuda else math.inf

    layers = a.layers
    if layers is None:
        layers = 2 if size == "tiny" else next(
            (n for n in (32, 16, 8) if arithmetic(llama_config(size, n), tokens, card)[0]
             <= 0.8 * card), 8) if card else 8
    config = llama_config(size, layers)
    need, lines = arithmetic(config, tokens, card)
    for line in lines:
        log(line)
    if card and need > card:
        log(f"the AdamW baseline may not fit: {need / 2**30:.1f} GiB > {card / 2**30:.1f} GiB")

    model_dir, export_dir = logdir / "cotrain-model", logdir / "cotrain-export"
    config.save_pretrained(model_dir)
    log(f"owner: building {layers} layers on {device} ...")
    owner = Owner(model_dir, export_dir, a.device, dtype, logdir / "cotrain_owner.log")
    rows: list[Row] = []
    extra: list[Row | str] = []
    try:
        log(f"owner: {owner.nbytes / 2**30:.2f} GiB of served weights built on {device} and "
            f"exported in {owner.build_seconds:.1f} s")
        export = attach(export_dir, timeout=60)
        settings = Settings(export_dir=str(export_dir))  # the server's defaults
        ctx = Ctx(export, config, VllmCoordinator(export), tokens,
                  torch.Generator().manual_seed(0), device, settings,
                  a.guard_layers or layers)
        watch = ["model.layers.0.mlp.gate_up_proj.weight",  # matrices the defaults train
                 f"model.layers.{layers - 1}.mlp.down_proj.weight"]
        what = (f"{layers} Llama-3-8B-shaped layers" if size == "8b" else
                f"{layers} tiny Llama layers (dry run)")
        total = sum(t.numel() for t in export.tensors.values())
        head = (f"Co-training: {what}, {total / 1e9:.3f} B params ({owner.nbytes / 2**30:.2f} "
                f"GiB served), {dtype}, batch 1 x {tokens} tokens ({tokens - tokens // 2} "
                f"targets), lr {settings.lr:g}, {device}"
                f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, torch "
                f"{torch.__version__}; median of {a.steps} steps after {a.warmup} warm-up")

        def write(final: bool = False) -> None:
            text = head + "\n\n" + tables(rows, extra) + "\n"
            (logdir / "cotrain.md").write_text(text)
            if final:
                print("\n" + text, flush=True)

        def run(name, make, into):
            into.append(measure(name, make, ctx, owner, watch, a.warmup, a.steps))
            write()

        main_rows = {
            "adamw": ("torch AdamW (fused), trainer copy + weight sync", lambda: AdamWCopy(ctx)),
            "standard": ("ours APOLLO-Mini, standard, in place", lambda: InPlace(ctx)),
            "layerwise": ("ours APOLLO-Mini, layer-wise, in place",
                          lambda: InPlace(ctx, layerwise=True)),
        }
        optional = {
            "check": ("standard + learn-then-stop check", lambda: InPlace(ctx, learned_check=True)),
            "server": ("server step, standard (check + write window)",
                       lambda: ServerStep(ctx, False)),
            "server-layerwise": ("server step, layer-wise (check + a synced window per "
                                 "parameter)", lambda: ServerStep(ctx, True)),
            "guard-host": (f"standard + null-space guard on {ctx.guard_layers} layer(s), bases "
                           "in host memory (the default)", lambda: InPlace(ctx, guard="host")),
            "guard-device": (f"standard + null-space guard on {ctx.guard_layers} layer(s), "
                             "bases in device memory", lambda: InPlace(ctx, guard="device")),
        }
        chosen = set(a.rows.split(",")) if a.rows else set(main_rows) | set(optional)
        if unknown := chosen - set(main_rows) - set(optional):
            raise SystemExit(f"--rows: unknown {sorted(unknown)}")
        for key, (name, make) in main_rows.items():
            if key in chosen:
                run(name, make, rows)
        for key, (name, make) in optional.items():
            if key not in chosen:
                continue
            if time.perf_counter() - T0 > budget:
                extra.append(f"| {name} | n/a: skipped, past the {budget:.0f} s budget | | | |")
                write()
                continue
            run(name, make, extra)
        write(final=True)
    finally:
        export = ctx = None
        gc.collect()  # this process's mappings of the owner's memory go before the owner
        owner.close()
    log("done")
    done = rows + [r for r in extra if isinstance(r, Row)]
    sys.exit(0 if done and all(r.ok and not r.error for r in done) else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["owner"]:
        with torch.no_grad():
            owner_main(*sys.argv[2:6])
    else:
        main()
