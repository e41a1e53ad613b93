"""bench/gpu_check.sh runs (on the CPU, --dry-run) so the GPU kit cannot rot."""

import subprocess

from tests.support import ROOT


def test_gpu_check_dry_run(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| check |"):]
    assert table.count("| ok |") == 8 and "FAIL" not in table
    assert (tmp_path / "gpu_check.log").exists() and (tmp_path / "optimizer_bench.md").exists()
    # the projection's best launch shapes reach the optimizer bench
    best = (tmp_path / "tune_projection.md").read_text().split("best: --tiles ")[1].split()[0]
    assert f"rank-1 projection tiles: {best}" in (tmp_path / "optimizer_bench.md").read_text()
