"""bench/gpu_check.sh runs (on the CPU, --dry-run) so the GPU kit cannot rot."""

import os
import subprocess
import sys

from tests.support import ROOT

# The rows the dry run performs, and those it cannot (the CPU compared with itself).
CHECKED = ["build model", "map onto owner's tensors", "train in place, owner sees updates",
           "checkpoint from device memory", "capturable step (no graph on CPU)",
           "projection launch shapes", "optimizer bench", "co-training bench"]
NOT_APPLICABLE = ["device vs CPU, APOLLO-Mini and rank 4, fp32",
                  "null-space guard, bases in host memory"]


def test_gpu_check_dry_run(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| check | result |"):].splitlines()[2:]
    results = {cells[1].strip(): cells[2].strip()
               for cells in (row.split("|") for row in table if row.startswith("| "))}
    assert results == {**dict.fromkeys(CHECKED, "ok"), **dict.fromkeys(NOT_APPLICABLE, "n/a")}
    assert (tmp_path / "gpu_check.log").exists() and (tmp_path / "optimizer_bench.md").exists()
    # the co-training bench: every mode ran and did what it should, the optional rows too
    cotrain = (tmp_path / "cotrain.md").read_text()
    for mode in ("torch AdamW (fused), trainer copy + weight sync",
                 "ours APOLLO-Mini, standard, in place", "ours APOLLO-Mini, layer-wise, in place",
                 "standard + learn-then-stop check", "server step, standard",
                 "server step, layer-wise", "standard + null-space guard on 2 layer(s), bases "
                 "in host memory", "standard + null-space guard on 2 layer(s), bases in device"):
        row = next(line for line in cotrain.splitlines() if line.startswith(f"| {mode}"))
        assert "| ok: " in row and "owner saw 2/2 change" in row, row
    assert "served == trainer copy" in cotrain
    # the projection's best launch shapes reach the optimizer bench
    best = (tmp_path / "tune_projection.md").read_text().split("best: --tiles ")[1].split()[0]
    assert f"rank-1 projection tiles: {best}" in (tmp_path / "optimizer_bench.md").read_text()


def test_gpu_check_rejects_an_unknown_mode(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), str(tmp_path), "--dryrun"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr


def test_the_kit_imports_only_what_the_gpu_machine_has():
    """The GPU machine cannot install anything: an import of a package its image lacks (a
    server module pulling in fastapi, say) would fail the device run, not the dry run."""
    out = subprocess.run([sys.executable, "-m", "bench.device_imports", "--check"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "every import the project made is on the GPU machine's image" in out.stdout
