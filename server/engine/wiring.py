"""The one place the training engine is put together, for the HTTP server and every rank.

`attach_engine` maps vLLM's export (starting the other trainer ranks under tensor
parallelism) and hands the model to `assemble`, which adds the optimizer, the example log,
the trainer and the checkpoint service. Tests assemble an engine around a local model.

Over 300 lines on purpose: it is the one place the engine is wired, so every part that is wired
appears here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from checkpoint import (
    Checkpointer,
    CheckpointRefused,
    Retention,
    checkpoint_blockers,
    read_layout,
)
from checkpoint.retention import parse_size
from optimizer import ApolloMini
from server.engine.checkpointing import CheckpointService
from server.engine.coordination import Standalone, VllmCoordinator
from server.engine.distributed import (
    Group,
    follow,
    free_port,
    gather_to_leader,
    join,
    start_followers,
)
from server.engine.example_log import ExampleLog
from server.engine.exclusive import hold_exclusive
from server.engine.files import FileStore
from server.engine.jobs import JobRunner, fine_tuning
from server.engine.locality import Monitor
from server.engine.trainer import Trainer
from server.engine.versions import VersionService
from server.settings import Settings
from weight_mapping import Export, attach, build_model, checkpoint_file_names, load_config

log = logging.getLogger("vllm_apollo.engine")


@dataclass
class Engine:
    """Everything one trainer rank runs; rank 0's also serves HTTP."""

    settings: Settings
    model: nn.Module
    tokenizer: object
    trainer: Trainer
    model_path: str
    export: Export | None = None
    checkpoints: CheckpointService | None = None
    versions: VersionService | None = None  # rollbacks; with checkpoints
    example_log: ExampleLog | None = None
    checkpointing_disabled: str | None = None  # why, when the model directory cannot take it
    files: FileStore | None = None  # uploaded training files (rank 0)
    jobs: JobRunner | None = None  # fine-tuning jobs (rank 0)

    def start(self) -> None:
        self.trainer.start()
        if self.jobs is not None:
            self.jobs.start()

    def problem(self) -> str | None:
        """Why this engine cannot take examples now (None: it can): the service is then
        unhealthy rather than accepting what it would not train."""
        if (reason := self.trainer.problem()) is not None:
            return reason
        if self.example_log is not None and self.example_log.broken:
            return self.example_log.broken
        if self.export is not None and not self.export.owner_alive():
            return "the vLLM process that owns the weights has exited"
        return None

    def stop(self) -> None:
        """Finish the batch in progress; with --checkpoint-on-exit sync what vLLM learned,
        else say how many steps the model files lack."""
        if self.jobs is not None:  # a running job stays journaled and resumes at next start
            self.jobs.stop()
        service = self.checkpoints
        if service is not None and self.settings.checkpoint_on_exit:
            self.trainer.stop(timeout=600.0, last=service.sync_on_exit)
        else:
            self.trainer.stop()
            unsaved = service.unsaved_steps() if service is not None else 0
            if unsaved > 0:
                log.warning("%d optimizer steps since the last checkpoint live only in vLLM's "
                            "memory and are gone when vLLM stops (POST /checkpoint first, or "
                            "--checkpoint-on-exit)", unsaved)
        if self.example_log is not None:
            self.example_log.close()
        if self.files is not None:
            self.files.close()


class Unsupported(ValueError):
    """A setting this model or this vLLM layout cannot have: the server refuses to start."""


# Where a decoder layer's feed-forward matrices live, by family (Llama, Qwen, Mistral, Phi,
# GPT-2, ...: mlp; Llama 4: feed_forward; Mixtral: block_sparse_moe).
MLP_MARKERS = (".mlp.", ".feed_forward.", ".block_sparse_moe.")


def param_groups(model: nn.Module, lr: float, train_embeddings: bool,
                 train_vectors: bool = True, matrices: str = "all") -> list[dict]:
    """Matrices of the decoder layers get APOLLO-Mini (with `matrices="mlp"` only the
    feed-forward ones); norms (and biases) AdamW unless `train_vectors` is off; embeddings
    frozen unless asked (AdamW on them would cost two extra copies of the vocabulary
    matrix)."""
    embeddings = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None for p in m.parameters()}
    trained, others, frozen = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen before: stays out of the optimizer
            continue
        if id(p) in embeddings:
            (others if train_embeddings else frozen).append(p)
        elif p.dim() == 2:
            mlp = matrices == "all" or any(m in f".{name}" for m in MLP_MARKERS)
            (trained if mlp else frozen).append(p)
        else:
            (others if train_vectors else frozen).append(p)
    if not trained and matrices == "mlp":
        raise Unsupported("--train-matrices mlp: this model has no feed-forward matrices by "
                         f"a name the trainer knows ({', '.join(MLP_MARKERS)}); use "
                         "--train-matrices all")
    for p in frozen:
        p.requires_grad_(False)
    return [{"params": trained, "lr": lr}, {"params": others, "lr": lr, "apollo": False}]


def _trainable_groups(model: nn.Module, settings: Settings) -> list[dict]:
    """param_groups under `settings` (freezing the rest). The null-space guard protects what
    matrices compute; a norm's scale reaches every input, so under that guard norms and
    biases stay as they are (bench/locality.py)."""
    return param_groups(model, settings.lr, settings.train_embeddings,
                        train_vectors=settings.guard != "nullspace",
                        matrices=settings.train_matrices)


def make_optimizer(model: nn.Module, settings: Settings) -> ApolloMini:
    return ApolloMini(_trainable_groups(model, settings), lr=settings.lr)


def assemble(settings: Settings, model: nn.Module, tokenizer, *, model_path: str,
             export: Export | None = None, checkpointer: Checkpointer | None = None,
             coordinator: Standalone | None = None, group: Group | None = None) -> Engine:
    """Optimizer, example log (rank 0), trainer and checkpoint service around `model`."""
    leader = group is None or group.leader
    example_log = open_example_log(settings, model_path, export) if leader else None
    trainer = Trainer(model, make_optimizer(model, settings), settings,
                      pad_id=tokenizer.pad_token_id or 0, example_log=example_log,
                      coordinator=coordinator, group=group,
                      monitor=_monitor(settings, tokenizer, example_log, group,
                                       _shared_reference(model_path, coordinator)))
    checkpoints = versions = None
    if checkpointer is not None:
        checkpoints = CheckpointService(checkpointer, trainer, settings.checkpoint_every_steps,
                                        settings.checkpoint_every_seconds)
        trainer.after_batch.append(checkpoints.maybe_sync)
        if leader:
            versions = VersionService(checkpoints, trainer,
                                      export.export_dir if export is not None else None)
    files, jobs = None, None
    if leader:
        files, jobs = fine_tuning(settings, trainer, tokenizer,
                                  example_log.path if example_log else None)
    return Engine(settings=settings, model=model, tokenizer=tokenizer, trainer=trainer,
                  model_path=model_path, export=export, checkpoints=checkpoints,
                  versions=versions, example_log=example_log, files=files, jobs=jobs)


def retention(settings: Settings) -> Retention | None:
    """--history-keep / --history-budget / --history-drop-original (None: keep no history)."""
    if settings.history_keep == "off":
        return None
    return Retention(keep=None if settings.history_keep == "all" else int(settings.history_keep),
                     budget=parse_size(settings.history_budget),
                     keep_original=not settings.history_drop_original)


def open_example_log(settings: Settings, model_path: str, export: Export | None
                     ) -> ExampleLog | None:
    """--journal: a path, off, or auto: MODEL_DIR/.apollo/examples.jsonl, or beside vLLM's
    export when the model directory is read-only (the log then lasts as long as the export,
    and so as long as the weights it describes: nothing can be checkpointed there)."""
    if settings.journal == "off" or (settings.journal == "auto" and export is None):
        return None
    if settings.journal != "auto":
        return ExampleLog(settings.journal)
    try:
        return ExampleLog(Path(model_path) / ".apollo" / "examples.jsonl")
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
    path = export.export_dir / "examples.jsonl"
    log.warning("the model directory %s is read-only: the example log is %s (it lasts as long "
                "as vLLM's export)", model_path, path)
    return ExampleLog(path)


def _monitor(settings: Settings, tokenizer, example_log: ExampleLog | None,
             group: Group | None, shared: Path | None) -> Monitor | None:
    """The probe monitor (drift after each batch, the gate, the guard), its reference kept
    beside the example log so a restart measures from the same place."""
    if settings.drift_budget > 0 and settings.drift_probes <= 0:
        log.warning("--drift-probes 0: no drift is measured, so no batch is held to "
                    "--drift-budget %g", settings.drift_budget)
    if settings.drift_probes <= 0 and settings.guard == "none":
        return None
    if group is not None:
        log.warning("drift monitor, gate and guard are not available under tensor "
                    "parallelism yet: training without them")
        return None
    store = example_log.path.parent / "probe-reference.pt" if example_log else None
    return Monitor(tokenizer, settings.probe_file, store, shared=shared,
                   per_batch=max(settings.drift_probes, 1), pad_id=tokenizer.pad_token_id or 0,
                   null_space_eps=settings.guard_eps if settings.guard == "nullspace" else None,
                   bases_on_device=settings.guard_bases == "device")


def _shared_reference(model_path: str, coordinator: Standalone | None) -> Path | None:
    """Where references made from the model's files (as on disk now) are cached: valid only
    while vLLM's weights still equal the files (no optimizer step applied since it loaded)."""
    if coordinator is None or coordinator.applied_steps() != 0:
        return None
    return shared_reference_path(model_path)


def prepare(model: nn.Module, tokenizer, model_path: str, settings: Settings) -> None:
    """Answer the probes and fit the guard on `model`, the weights in `model_path`'s files,
    into its cache (MODEL_DIR/.apollo): a server started on those files under `settings`
    then trains from its first request instead of first spending minutes on them."""
    _trainable_groups(model, settings)  # the layers the guard covers: the trained ones
    monitor = _monitor(settings, tokenizer, None, None, shared_reference_path(model_path))
    if monitor is not None:
        monitor.ensure_reference(model)
        monitor.ensure_guard(model)


def shared_reference_path(model_path: str) -> Path | None:
    """The cache of references made from the model's files as they are on disk now."""
    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        return None
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(repr(stats).encode()).hexdigest()[:16]
    return Path(model_path) / ".apollo" / f"probe-reference-{key}.pt"


def attach_engine(settings: Settings, rank: int = 0, port: int = 0) -> Engine:
    """Rank `rank`'s engine on vLLM's rank `rank` export. Under tensor parallelism rank 0
    (the server) also starts ranks 1..N-1, and all join one process group."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    export = attach(settings.export_dir, rank=rank, timeout=settings.attach_timeout)
    if rank == 0:  # one trainer per vLLM (two would both step its weights); the fd stays
        # open, and the lock held, until this process exits
        hold_exclusive(export.trainer_lock_path, f"vLLM's export {export.export_dir}")
    group = None
    if export.world_size > 1:
        if settings.train_embeddings:
            raise Unsupported("--train-embeddings is not supported with tensor parallelism: "
                             "vLLM's ranks > 0 read the embedding before the step's first "
                             "collective, outside the step lock")
        if settings.optimizer_mode == "layerwise":
            raise Unsupported("--optimizer-mode layerwise is not supported with tensor "
                             "parallelism; use standard")
        if rank == 0:
            port = free_port()
            start_followers(follower_main, settings, export.world_size, port)
        group = join(rank, export.world_size, port, export.device,
                     timeout=settings.attach_timeout + 60)
    model = build_model(export.tensors, load_config(export.model_path), shards=export.shards,
                        mesh=group.mesh if group else None)
    tokenizer = AutoTokenizer.from_pretrained(export.model_path)
    log.info("rank %d/%d attached to %s: %d parameters mapped onto vLLM's tensors", rank,
             export.world_size, export.model_path, sum(1 for _ in model.parameters()))
    checkpointer, disabled = _checkpointer(model, export.model_path, group,
                                           retention(settings)) if rank == 0 else (None, None)
    coordinator = VllmCoordinator(export, settings.consistency, settings.prefix_cache_reset,
                                  group)
    engine = assemble(settings, model, tokenizer, model_path=export.model_path, export=export,
                      checkpointer=checkpointer, coordinator=coordinator, group=group)
    engine.checkpointing_disabled = disabled
    return engine


def _checkpointer(model: nn.Module, model_path: str, group: Group | None,
                  history: Retention | None = None) -> tuple[Checkpointer | None, str | None]:
    """Rank 0's checkpointer (the other ranks send it their shards), or None and the reason,
    logged, when the model directory cannot take checkpoints (read-only, symlinked weights as
    in a Hugging Face cache snapshot, ...): the server then serves and trains without them."""
    blockers = checkpoint_blockers(model_path)
    if not blockers:
        params = dict(model.named_parameters(remove_duplicate=False))
        try:
            return Checkpointer(
                model_path, params,
                file_names=checkpoint_file_names(list(params), set(read_layout(model_path))),
                gather=(lambda t: gather_to_leader(t, group)) if group else None,
                history=history), None
        except CheckpointRefused as exc:
            blockers = [str(exc)]
    reason = "; ".join(blockers)
    log.warning("checkpointing disabled for %s: %s", model_path, reason)
    return None, reason


def _exit_with_parent(parent: int) -> None:
    """Rank 0 gone without a "stop" (a crash, kill -9): this rank has nothing left to do."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def follower_main(settings: Settings, rank: int, port: int) -> None:
    """Trainer ranks 1..N-1: attach to vLLM's rank r, then do what rank 0 says. They serve no
    HTTP and keep no example log."""
    # The launcher TERMs the training server's whole process group at once; rank 0 then
    # still needs this rank for a final checkpoint (--checkpoint-on-exit) and says "stop".
    # Rank 0's end, however it comes, ends this rank.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    engine = attach_engine(settings, rank=rank, port=port)
    follow(engine.trainer.group, engine.trainer,
           dict(engine.model.named_parameters(remove_duplicate=False)))
