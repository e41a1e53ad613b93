"""python -m server.client train data.jsonl [--epochs N]: upload, start a job, follow it.

The common case of the fine-tuning API in one command, through the official `openai` client
(what users' own scripts use, so the CLI exercises exactly that): upload the file (invalid
lines are named, and nothing starts), create a job on the served model, and follow its events
with a progress bar until it ends. Exit status: 0 succeeded, 1 failed or cancelled, 2 could
not start. Ctrl-C cancels the job; the weights stay as trained so far.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from server.settings import KEY_ENV, read_key

FINAL = ("succeeded", "failed", "cancelled")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server.client",
                                description="Fine-tune the served model from a JSONL file.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="upload FILE, train the served model on it, follow it")
    t.add_argument("file", help="JSONL in OpenAI's chat fine-tuning format")
    t.add_argument("--epochs", type=int, help="passes over the file (default: the server's "
                                              "auto, 1)")
    t.add_argument("--batch-size", type=int, help="examples per batch (default: the server's "
                                                  "--batch-size)")
    t.add_argument("--lr-multiplier", type=float, help="times the server's --lr (default 1)")
    t.add_argument("--url", default=os.environ.get(
        "APOLLO_TRAIN_URL", f"http://127.0.0.1:{os.environ.get('TRAIN_PORT', '8001')}"),
        help="the training server (env APOLLO_TRAIN_URL; default: %(default)s)")
    t.add_argument("--api-key-file", help=f"file holding the server's API key (or set "
                                          f"{KEY_ENV})")
    t.add_argument("--poll", type=float, default=1.0, help="seconds between event polls")
    return p


def _served_model(url: str) -> str:
    with urllib.request.urlopen(f"{url}/status", timeout=30) as r:  # noqa: S310 (user's URL)
        return json.load(r)["model_path"]


def _follow(client, job_id: str, poll: float):
    """Print the job's events and a progress bar until it ends; its last state."""
    from tqdm import tqdm

    seen: set[str] = set()
    bar = tqdm(unit="ex", dynamic_ncols=True, file=sys.stderr)
    try:
        while True:
            # the state first: events listed after a final state include the job's last ones
            job = client.fine_tuning.jobs.retrieve(job_id)
            new = []
            for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
                if event.id in seen:
                    break
                new.append(event)
            for event in reversed(new):  # oldest first
                seen.add(event.id)
                data = event.data if isinstance(event.data, dict) else {}
                if event.type == "metrics":
                    bar.total = data.get("examples_total") or bar.total
                    bar.n = data.get("examples_done", bar.n)
                    loss = data.get("train_loss")
                    bar.set_postfix_str(f"epoch {data.get('epoch')}/{data.get('n_epochs')}"
                                        + (f" loss {loss:.3f}" if loss is not None else ""))
                else:
                    bar.write(f"{event.level}: {event.message}")
            bar.refresh()
            if job.status in FINAL:
                return job
            time.sleep(poll)
    finally:
        bar.close()


def train(args: argparse.Namespace) -> int:
    try:
        import openai
    except ImportError:
        print("error: the CLI needs the openai package (pip install openai)", file=sys.stderr)
        return 2
    key = read_key(args.api_key_file) if args.api_key_file else os.environ.get(KEY_ENV)
    client = openai.OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key=key or "none",
                           max_retries=5)
    path = Path(args.file)
    try:
        t0 = time.monotonic()
        with open(path, "rb") as f:
            uploaded = client.files.create(file=(path.name, f), purpose="fine-tune")
        seconds = time.monotonic() - t0
        print(f"uploaded {path} as {uploaded.id}: {uploaded.bytes / 1e6:.1f} MB in "
              f"{seconds:.1f} s", file=sys.stderr)
        hp = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                ("learning_rate_multiplier", args.lr_multiplier)) if v}
        job = client.fine_tuning.jobs.create(
            model=_served_model(args.url.rstrip("/")), training_file=uploaded.id,
            method={"type": "supervised", "supervised": {"hyperparameters": hp}})
    except (openai.APIStatusError, openai.APIConnectionError, OSError) as exc:
        body = getattr(exc, "body", None)
        message = body.get("message") if isinstance(body, dict) else None
        print(f"error: {message or exc}", file=sys.stderr)
        return 2
    print(f"job {job.id} on {job.model}", file=sys.stderr)
    try:
        job = _follow(client, job.id, args.poll)
    except KeyboardInterrupt:
        job = client.fine_tuning.jobs.cancel(job.id)
        print(f"job {job.id} {job.status} (the weights stay as trained so far)",
              file=sys.stderr)
        return 130
    if job.status != "succeeded":
        why = f": {job.error.message}" if job.error else ""
        print(f"job {job.id} {job.status}{why}", file=sys.stderr)
        return 1
    print(f"job {job.id} succeeded: {job.model} answers as trained", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
