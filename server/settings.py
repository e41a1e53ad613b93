"""The training server's settings: one dataclass, the only place a default is written.

The command line (`python -m server --help`) is generated from the fields: each field's
metadata carries its help text (and choices, or an environment variable that supplies the
default). The engine, the HTTP layer and every trainer rank read the same `Settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         env: str | None = None, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "env": env,
                                            "cli": cli})


KEY_ENV = "VLLM_APOLLO_API_KEY"
VLLM_KEY_ENV = "VLLM_API_KEY"


def is_loopback(host: str) -> bool:
    """A bind address only this machine reaches (a name other than localhost is not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Settings:
    export_dir: str = field(metadata={"help": "directory the vLLM hook exports into"})
    host: str = _opt("127.0.0.1", "address to listen on", env="BIND_HOST")
    port: int = _opt(8001, "port to listen on", env="TRAIN_PORT")
    lr: float = _opt(3e-4, "APOLLO-Mini learning rate (3e-4 learns a one-line lesson in about "
                           "5 steps on the fp32 default model under the null-space guard)")
    batch_size: int = _opt(8, "max examples per optimizer step")
    max_steps_per_batch: int = _opt(12, "most optimizer steps on one batch; it stops as soon "
                                       "as its targets are learned (--learned-prob)")
    learned_prob: float = _opt(0.5, "a batch is learned when every target token is the "
                                    "model's greedy choice with at least this probability; "
                                    "1 never stops early (always --max-steps-per-batch)")
    beta: float = _opt(0.1, "DPO / KTO β: the weight of the log-prob ratio to the reference "
                            "(the live weights as each batch starts) inside their sigmoids; "
                            "docs/preferences.md")
    preference_margin: float = _opt(1.0, "a preference pair is learned when the preferred "
                                         "answer's log-prob gained at least this many nats "
                                         "over the non-preferred one's since the batch "
                                         "started, and the non-preferred answer's first "
                                         "differing token is no longer the greedy choice")
    dpo_sft_weight: float = _opt(1.0, "add this weight times the preferred answers' "
                                      "cross-entropy per token to DPO (TRL's loss_type "
                                      "[\"sigmoid\", \"sft\"], RPO): DPO alone mostly "
                                      "lowers the non-preferred answer; this also raises the "
                                      "preferred one (docs/preferences.md); 0: plain DPO")
    kto_desirable_weight: float = _opt(1.0, "KTO's weight on thumbs-up answers")
    kto_undesirable_weight: float = _opt(1.0, "KTO's weight on thumbs-down answers")
    drift_budget: float = _opt(0.02, "largest mean KL per probe answer token a batch may add "
                                     "(from where it started); a batch over it is undone "
                                     "bit-exactly and its examples fail (0: no gate; the "
                                     "gate needs --drift-probes > 0)")
    drift_probes: int = _opt(16, "probes evaluated after each batch (half the nearest to its "
                                 "prompts, half a rotating window; 0: no drift monitor)")
    probe_file: str | None = _opt(None, "JSONL of probes ({\"messages\": [...]} or "
                                        "{\"prompt\": ...} per line, optionally "
                                        "\"pin\": true to keep that answer exactly, or "
                                        "\"keep\": true to restore its greedy answer after "
                                        "any batch that moves it, until a lesson asks it); "
                                        "default: the 230 shipped prompts")
    strict_drift: bool = _opt(False, "hold vLLM's engine steps off from a batch's first write "
                                     "until its drift is measured (never serves over budget; "
                                     "serving stalls for the batch)")
    guard: str = _opt("nullspace", "keep the rest of the model in place while learning: "
                                   "nullspace (a lesson changes each matrix only along input "
                                   "directions the probe set does not use), distill (add KL "
                                   "to the reference on --guard-probes probes to every step), "
                                   "or none", choices=("nullspace", "distill", "none"))
    train_matrices: str = _opt("mlp", "decoder matrices a lesson changes: mlp (the "
                                      "feed-forward ones, where facts are recalled; under "
                                      "the guard they keep the rest of the model in place "
                                      "best, docs/locality.md) or all (attention too)",
                               choices=("mlp", "all"))
    guard_eps: float = _opt(1e-2, "--guard nullspace: share of the probe inputs' energy left "
                                  "unprotected (smaller protects more directions)")
    guard_bases: str = _opt("host", "--guard nullspace on a GPU: where its bases are kept: "
                                    "host (pinned memory, each layer's copied in one layer "
                                    "ahead of backward; no GPU memory beyond two layers' "
                                    "worth) or device (beside the weights: faster, "
                                    "docs/locality.md gives both)", choices=("host", "device"))
    guard_probes: int = _opt(2, "probes added to every step by --guard distill")
    guard_weight: float = _opt(1.0, "weight of the --guard distill term")
    max_tokens_per_example: int = _opt(2048, "longest example accepted, in tokens")
    max_examples_per_request: int = _opt(256, "most examples in one POST /train")
    max_messages_per_example: int = _opt(256, "most messages in one example (checked before "
                                              "the chat template runs)")
    max_chars_per_example: int = _opt(65536, "most characters of message content in one "
                                             "example (checked before the chat template and "
                                             "the tokenizer run)")
    max_queue: int = _opt(4096, "most examples accepted and not yet trained (then 429)")
    max_queue_tokens: int = _opt(1 << 20, "most tokens in examples accepted and not yet "
                                          "trained (then 429)")
    keep_finished_records: int = _opt(100_000, "finished examples whose state GET /examples/ID "
                                               "still answers (older ones: 404; the example "
                                               "log keeps every outcome)")
    train_embeddings: bool = _opt(False, "also train embeddings / LM head (AdamW: 2 extra "
                                         "copies of them)")
    threads: int = _opt(0, "torch CPU threads (0: torch's default)")
    attach_timeout: float = _opt(600.0, "seconds to wait for vLLM's export")
    # Never on the command line (argv is visible to every local user in ps): from
    # --api-key-file or the environment.
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on endpoints that "
                                     "change the model", env=KEY_ENV, cli=False)
    api_key_file: str | None = _opt(None, "file holding the API key that endpoints changing "
                                          f"the model require (or set {KEY_ENV}); required to "
                                          "listen beyond loopback")
    vllm_url: str = _opt("", "vLLM's OpenAI-compatible server (e.g. http://127.0.0.1:8000), "
                             "which POST /v1/chat/completions here forwards to (the browser "
                             "console's chat); the launcher sets it; empty: no chat")
    # vLLM's own key, for that forwarding (the launcher's VLLM_API_KEY); never on the command
    # line. Used only when this server has a key of its own, which callers must then give.
    vllm_api_key: str | None = _opt(None, "vLLM's API key", env=VLLM_KEY_ENV, cli=False)
    allowed_hosts: str = _opt("", "comma-separated host names requests may address besides "
                                  "loopback ones and the bind address (the Host header; "
                                  "guards against DNS rebinding); '*' allows any")
    checkpoint_every_steps: int = _opt(0, "sync the live weights into the model files every N "
                                          "optimizer steps")
    checkpoint_every_seconds: float = _opt(0.0, "... or when T seconds passed since the last "
                                                "sync (checked per batch)")
    checkpoint_on_exit: bool = _opt(False, "when the server stops (SIGTERM, the launcher's "
                                           "Ctrl-C), finish the batch in progress and sync what "
                                           "vLLM's weights learned since the last checkpoint")
    history_keep: str = _opt("all", "checkpoint versions kept restorable below the newest "
                                    "(POST /rollback, python -m checkpoint revert; the "
                                    "original is kept besides): N, all, or off (no undo "
                                    "records: rollback only to the last checkpoint; the "
                                    "cheapest checkpoints)")
    history_budget: str = _opt("0", "disk budget of the history store (MODEL_DIR/.apollo/"
                                    "history), e.g. 20G; past it the oldest versions are "
                                    "dropped first, the original never unless "
                                    "--history-drop-original; 0: none")
    history_drop_original: bool = _opt(False, "let --history-budget drop the original "
                                              "version too, after every other")
    journal: str = _opt("auto", "durable example log: a path, 'auto' (MODEL_DIR/.apollo/"
                                "examples.jsonl; EXPORT_DIR/examples.jsonl when the model "
                                "directory is read-only) or 'off'")
    consistency: str = _opt("step", "step: no vLLM engine step sees a partly applied optimizer "
                                    "step (the write excludes engine steps); none: no "
                                    "exclusion (unsafe; for tests)", choices=("step", "none"))
    prefix_cache_reset: str = _opt("always", "drop vLLM's prefix cache after updates: always, "
                                             "never, or SECONDS (at most once per interval)")
    max_body_bytes: int = _opt(4 << 20, "largest request body accepted (then 413)")
    max_upload_bytes: int = _opt(512 << 20, "largest training file POST /v1/files accepts "
                                            "(then 413); streamed to disk, never held in "
                                            "memory; every other endpoint keeps "
                                            "--max-body-bytes")
    served_model_name: str = _opt("", "comma-separated names vLLM serves the model under "
                                      "(its --served-model-name), accepted as a fine-tuning "
                                      "job's model besides the model's path")
    train_share: float = _opt(0.5, "share of wall time the trainer's forward and backward may "
                                   "take while vLLM is serving: after each chunk of training "
                                   "work that overlapped serving it waits (1-F)/F times the "
                                   "chunk's time, or until serving goes idle (docs/service.md"
                                   "#training-in-the-gaps); 1: never wait")
    train_share_above: int = _opt(-1, "the share holds only while vLLM's engine steps run more "
                                      "than this many requests at once; at most that many, "
                                      "training owes serving no wait (CPU: vLLM's engine keeps "
                                      "to its own cores, and one request leaves a core free). "
                                      "-1: 1 on CPU, 0 on a GPU")
    train_max_wait: float = _opt(10.0, "most seconds the trainer waits for serving per "
                                       "optimizer step (--train-share): at least one step per "
                                       "this plus the step's own time, however busy serving is")
    train_threads_busy: int = _opt(1, "torch CPU threads of a chunk of training work that "
                                      "starts while vLLM is serving (a chunk in a gap uses "
                                      "all, see --threads); 0: always all")
    train_nice: int = _opt(0, "nice value (0-19) of the trainer's compute thread and the "
                              "threads it starts, so the OS runs vLLM first when both want "
                              "the CPU (docs/service.md#training-in-the-gaps); 0: equal "
                              "priority; the HTTP API keeps the process's priority")
    optimizer_mode: str = _opt("standard", "standard: all gradients, then one step written "
                                           "atomically for vLLM; layerwise: each parameter "
                                           "stepped during backward (lowest memory; an engine "
                                           "step may see some layers updated and others not)",
                               choices=("standard", "layerwise"))

    def __post_init__(self) -> None:
        if not 0 < self.learned_prob <= 1:
            raise ValueError("--learned-prob must be in (0, 1]")
        if self.beta <= 0:
            raise ValueError("--beta must be positive")
        if self.preference_margin < 0:
            raise ValueError("--preference-margin must be at least 0")
        if min(self.kto_desirable_weight, self.kto_undesirable_weight, self.dpo_sft_weight) < 0:
            raise ValueError("--kto-desirable-weight, --kto-undesirable-weight and "
                             "--dpo-sft-weight must be at least 0")
        if not 0 < self.train_share <= 1:
            raise ValueError("--train-share must be in (0, 1]")
        if self.train_share_above < -1:
            raise ValueError("--train-share-above must be -1 (auto) or at least 0")
        if self.train_threads_busy < 0:
            raise ValueError("--train-threads-busy must be at least 0")
        if not 0 <= self.train_nice <= 19:
            raise ValueError("--train-nice must be in 0..19")
        if self.train_max_wait < 0:
            raise ValueError("--train-max-wait must be at least 0")
        if self.max_steps_per_batch < 1:
            raise ValueError("--max-steps-per-batch must be at least 1")
        if not self.api_key and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on {self.host} without an API key: anyone who "
                             "reaches it could retrain the model; give --api-key-file FILE or "
                             f"set {KEY_ENV}")
        if self.vllm_url and not re.fullmatch(r"https?://[^/?#\s]+/?", self.vllm_url):
            raise ValueError(f"--vllm-url must be http(s)://HOST:PORT, not {self.vllm_url!r}")
        if self.history_keep not in ("all", "off") and not (
                self.history_keep.isdigit()):
            raise ValueError("--history-keep must be a number, all or off")
        if not re.fullmatch(r"\d+(\.\d+)?[KMGT]?(i?B)?", self.history_budget.strip(),
                            re.IGNORECASE):
            raise ValueError("--history-budget must be a size such as 0, 512M or 20G")
        if self.prefix_cache_reset not in ("always", "never"):
            try:
                float(self.prefix_cache_reset)
            except ValueError:
                raise ValueError("--prefix-cache-reset must be always, never or a number of "
                                 "seconds") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server",
                                description="Training server attached to a live vLLM export.")
    p.add_argument("--api-key", action=_NoKeyInArgv, help=argparse.SUPPRESS)
    for f in dataclasses.fields(Settings):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if not meta.get("cli", True):
            continue
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=meta["help"])
        elif f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                           help=meta["help"])
        else:
            kind = {"int": int, "float": float}.get(f.type.split(" |")[0], str)
            default = os.environ.get(meta["env"], f.default) if meta["env"] else f.default
            env = f" (env {meta['env']})" if meta["env"] else ""
            p.add_argument(flag, type=kind, default=default, choices=meta["choices"],
                           help=f"{meta['help']}{env}; default: %(default)s")
    return p


class _NoKeyInArgv(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"--api-key is not accepted on the command line (every local user sees "
                     f"argv in ps): put the key in a file and give --api-key-file FILE, or set "
                     f"{KEY_ENV}")


def read_key(path: str) -> str:
    """The key in `path` (surrounding whitespace removed); refused if empty or if other users
    may write it."""
    st = os.stat(path)
    if st.st_mode & 0o022:
        raise ValueError(f"--api-key-file {path} is writable by other users: chmod 600 it")
    key = Path(path).read_text().strip()
    if not key:
        raise ValueError(f"--api-key-file {path} is empty")
    return key


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = _parser()
    try:
        args = vars(parser.parse_args(argv))
        args["api_key"] = read_key(args["api_key_file"]) if args["api_key_file"] else \
            os.environ.get(KEY_ENV) or None
        args["vllm_api_key"] = os.environ.get(VLLM_KEY_ENV) or None
        return Settings(**args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
