"""What a killed launcher leaves behind, and the sweep at the next start.

The launcher's servers run in sessions of their own (setsid), so they outlive a launcher
killed with SIGKILL, as do their shared-memory files (/dev/shm) and the run directory. Each
launcher records itself and its servers in a state file (PID and start time each: a reused
PID is another process) in a private per-user directory; the next launcher stops the servers
of every record whose launcher is gone (TERM to their process groups, then KILL), removes
their exports and shared memory, and the run directory the launcher had created.

    python -m hooks sweep                                     (prints the record directory)
    python -m hooks record STATE_FILE ROLE PID [KEY=VALUE ...]

vLLM itself leaves files behind on every stop: its gloo rendezvous file
(TMPDIR/vllm_dist_ID) and, under tensor parallelism on CPU, its shared memory
(/dev/shm/vllm_dist_ID-...-cpushm_R). The worker hook notes ID in the export
(`note_vllm_dist`); the launcher's cleanup and the sweep remove them (`clean_export`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import tempfile
import time
from pathlib import Path

from hooks.contract import SHM_ROOT, atomic_write, process_start

VLLM_DIST = "vllm_dist"  # in the export directory: the ID of vLLM's rendezvous files
_DIST_NAME = re.compile(r"vllm_dist_[0-9a-f]{32}")


def note_vllm_dist(export_dir: str | os.PathLike, init_method: str | None) -> None:
    """In vLLM's worker: note the name of vLLM's rendezvous file (its `file://` init method,
    TMPDIR/vllm_dist_ID) in the export, for `remove_vllm_dist` after vLLM stops."""
    if init_method and init_method.startswith("file://"):
        name = Path(init_method.removeprefix("file://")).name
        if _DIST_NAME.fullmatch(name):
            atomic_write(Path(export_dir) / VLLM_DIST, name.encode())


def vllm_dist_files(export_dir: str | os.PathLike) -> list[Path]:
    """The rendezvous file and tensor-parallel shared memory the export's note names (only
    names vLLM gives: vllm_dist_ and 32 hex digits, in TMPDIR and /dev/shm); [] without a
    note."""
    try:
        name = (Path(export_dir) / VLLM_DIST).read_text().strip()
    except OSError:
        return []
    if not _DIST_NAME.fullmatch(name):
        return []
    return [Path(tempfile.gettempdir()) / name, *Path(SHM_ROOT).glob(f"{name}-*")]


def remove_vllm_dist(export_dir: str | os.PathLike) -> list[Path]:
    """Once vLLM has stopped: remove the files `vllm_dist_files` names, then the note. The
    files removed."""
    removed = []
    for path in vllm_dist_files(export_dir):
        try:
            path.unlink()
            removed.append(path)
        except OSError:  # gone already, or not a file we may remove: never fail a start
            pass
    (Path(export_dir) / VLLM_DIST).unlink(missing_ok=True)
    return removed


def clean_export(export_dir: str | os.PathLike) -> tuple[int, list[Path]]:
    """Once vLLM has stopped: its exports (and their shared memory) and the files vLLM left.
    The number of exports removed and the files removed."""
    from hooks.export import remove_all_exports  # torch: only when there is work

    return remove_all_exports(export_dir), remove_vllm_dist(export_dir)


def state_dir() -> Path:
    """This user's directory of launcher records: created 0700, refused if it is anyone
    else's or a link (a planted record would name processes to kill)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    d = Path(base) / f"vllm-apollo-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{d} is not a private directory of this user: remove it")
    return d


def record(path: Path, role: str, pid: int, **extra: str) -> None:
    """Add process `pid` (`role`: launcher, vllm, train) and `extra` facts to the record."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"processes": []}
    state["processes"].append({"role": role, "pid": pid, "start": process_start(pid)})
    state.update(extra)
    atomic_write(path, json.dumps(state).encode())


def _alive(entry: dict) -> bool:
    return entry.get("start") is not None and process_start(entry["pid"]) == entry["start"]


def _stop(entry: dict, grace: float = 10.0) -> None:
    """TERM the process group the server leads (it was started with setsid); once the server
    is gone or after `grace` s, KILL what is left of the group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(entry["pid"], sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and _alive(entry) and time.monotonic() < deadline:
            time.sleep(0.1)


def sweep(directory: Path) -> list[str]:
    """Clean up after every recorded launcher that is gone; what was done, one line each."""
    done = []
    for path in sorted(directory.glob("*.json")):
        try:
            state = json.loads(path.read_text())
            processes = state["processes"]
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)
            continue
        launcher = next((p for p in processes if p["role"] == "launcher"), None)
        if launcher is not None and _alive(launcher):
            continue  # another launcher, running
        servers = [p for p in processes if p["role"] != "launcher" and _alive(p)]
        for entry in servers:
            _stop(entry)
        export_dir, exports = state.get("export_dir"), 0
        if export_dir and os.path.isdir(export_dir):
            exports = clean_export(export_dir)[0]
        run_dir = state.get("remove_run_dir")
        if run_dir and os.path.isdir(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        path.unlink(missing_ok=True)
        done.append(f"swept after launcher {launcher and launcher['pid']}: stopped "
                    f"{len(servers)} server(s), removed {exports} export(s)"
                    + (f" and {run_dir}" if run_dir else ""))
    return done
