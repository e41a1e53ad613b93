"""The GPU check: the export / map / train-in-place / checkpoint path on one CUDA device, with
a stand-in owner process where vLLM would be (bench/gpu_check.sh runs it).

Needs torch, transformers and safetensors only (no vLLM, no network; the ``--device cpu`` dry
run also xxhash, the checkpointer's CPU checksums). The dry run is what CI uses so the kit
cannot rot; a check it cannot perform there says "n/a", not "ok".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from bench.optimizer import graphed
from checkpoint import Checkpointer
from optimizer import Apollo, ApolloMini
from server.engine.coordination import VllmCoordinator
from server.engine.nullspace import NullSpaceGuard
from server.engine.projection import Projector
from server.engine.tokenization import Encoded
from server.engine.trainer import Trainer
from server.engine.wiring import param_groups
from server.settings import Settings
from tests.support.standin_owner import OwnerProcess
from weight_mapping import attach, build_model, shares_storage

ROOT = Path(__file__).resolve().parent.parent


def make_model(model_dir: Path, gpu: bool) -> tuple[LlamaConfig, tuple[str, str, str]]:
    """The stand-in model, saved as the owner will load it; its row checks that the files
    hold every tensor of the model built, equal."""
    t0 = time.perf_counter()
    size = (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000) if gpu else
            dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024))
    config = LlamaConfig(architectures=["LlamaForCausalLM"], head_dim=64,
                         max_position_embeddings=1024, tie_word_embeddings=False, **size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if gpu else
                                             torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    saved = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        saved.update(load_file(f))
    built = model.state_dict()
    same = saved.keys() == built.keys() and all(torch.equal(saved[n], t)
                                                 for n, t in built.items())
    return config, ("build model", "ok" if same else "FAIL",
                    f"{len(saved)}/{len(built)} tensors on disk equal to the model built, "
                    f"{time.perf_counter() - t0:.1f} s")


def _mini_problem(device: str, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(512, 256), (256, 768), (1024, 1024), (256,)]
    return [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype)
            .requires_grad_(True) for s in shapes]


def _grads(params: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + k)
    grads = [(torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype) for p in params]
    if k == 10:
        grads[1][3, 4] = float("inf")  # a non-finite step in the middle
    return grads


def graph_check(device: str) -> tuple[str, str, str]:
    """opt.step() captured in a CUDA graph and replayed gives bit for bit the weights that
    eager steps give, skips the non-finite step, and an eager step makes no host sync. The
    CPU dry run compares the capturable step with the default one instead (no graphs)."""
    gpu = device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    a, b = _mini_problem(device, dtype), _mini_problem(device, dtype)
    opt_a = ApolloMini(a, lr=1e-3, capturable=True, update_proj_gap=1000)
    opt_b = ApolloMini(b, lr=1e-3, capturable=gpu, update_proj_gap=1000)
    for opt, params in ((opt_a, a), (opt_b, b)):  # same rounding seed for both
        for p, g in zip(params, _grads(params, -1), strict=True):
            p.grad = g
        torch.manual_seed(0)
        opt.step()
    if gpu:
        step_a = graphed(opt_a)  # 3 more warm-up steps, then capture
        for _ in range(3):
            opt_b.step()
    else:
        step_a = opt_a.step
    t0 = time.perf_counter()
    for k in range(20):
        for p, g in zip(a, _grads(a, k), strict=True):
            p.grad.copy_(g)  # the graph reads the gradients where they were at capture
        step_a()
        for p, g in zip(b, _grads(b, k), strict=True):
            p.grad = g
        if gpu:
            torch.cuda.set_sync_debug_mode("error")  # raises on any host synchronisation
        try:
            opt_b.step()
        finally:
            if gpu:
                torch.cuda.set_sync_debug_mode(0)
    seconds = time.perf_counter() - t0
    same = all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    skipped = (opt_a.skipped_steps, opt_b.skipped_steps)
    ok = same and skipped == (1, 1)
    what = "graph replay == eager, bit for bit" if gpu else "capturable == default"
    syncs = "; eager step under sync_debug_mode=error" if gpu else ""
    return ("CUDA graph capture" if gpu else "capturable step (no graph on CPU)",
            "ok" if ok else "FAIL",
            f"{what}: {same}; skipped steps {skipped} (expected 1, 1); 20 steps "
            f"{seconds:.1f} s{syncs}")


def agreement_check(device: str) -> tuple[str, str, str]:
    """The device's kernels (Triton projection and write, cuBLAS) against the CPU, fp32:
    APOLLO-Mini (rank-1 projection kernel, per-tensor factor) and APOLLO rank 4 channel-wise
    (matmul projection, per-row / per-column factors). The CPU dry run has nothing to
    compare the CPU with: n/a."""
    name = "device vs CPU, APOLLO-Mini and rank 4, fp32"
    if not device.startswith("cuda"):
        return name, "n/a", "the dry run's device is the CPU itself"
    diffs = {}
    for name, hp in (("Mini", dict(rank=1, scale=128.0, scale_type="tensor")),
                     ("rank 4", dict(rank=4, scale_type="channel"))):
        results = []
        for dev in (device, "cpu"):
            params = _mini_problem(dev, torch.float32)
            opt = Apollo([{"params": params[:3]}, {"params": params[3:], "apollo": False}],
                         lr=1e-3, weight_decay=0.01, **hp)
            for k in range(20):
                for p, g in zip(params, _grads(params, k), strict=True):
                    p.grad = g
                opt.step()
            results.append([p.detach().cpu() for p in params])
        diffs[name] = max(((x - y).abs().max() / y.abs().max()).item()
                          for x, y in zip(*results, strict=True))
    return (name, "ok" if max(diffs.values()) <= 1e-5 else "FAIL",
            "20 steps, max rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


def guard_staging_check(device: str) -> tuple[str, str, str]:
    """The null-space guard on bf16 weights with its projectors in pinned host memory (the
    default), copied in one layer ahead of backward on a side stream, against the same
    projectors kept on the device: equal weight gradients, nothing held on the device
    between steps, backward's extra peak bounded by two layers' projectors; and how much of
    each gradient lies in the protected span with the fp16 complement (the GPU's path)
    against the projection in fp32 then rounded to bf16 (the path before). The CPU has one
    memory: n/a."""
    name = "null-space guard, bases in host memory"
    if not device.startswith("cuda"):
        return name, "n/a", "the dry run's device is the CPU itself: nothing to copy"
    width, layers, tokens = 4096, 8, 1024
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False)
                                  for _ in range(layers)]).to(device, torch.bfloat16)
    x = torch.randn(tokens, width, generator=g).to(device, torch.bfloat16)
    ranks = [width // 4 if i % 2 else width - width // 8 for i in range(layers)]
    vectors = [torch.linalg.qr(torch.randn(width, width, generator=g))[0] for _ in ranks]
    seen: dict[int, list] = {}  # each layer's input and output gradient, last run's

    def keep_input(i: int, args: tuple) -> None:
        seen[i] = [args[0]]

    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: keep_input(i, a))
             for i, m in enumerate(model)]
    hooks += [m.register_full_backward_hook(lambda m, gi, go, i=i: seen[i].append(go[0]))
              for i, m in enumerate(model)]

    def grads(on_device: bool | None) -> tuple[list[torch.Tensor], int, int]:
        guard, held = None, 0
        if on_device is not None:
            guard = NullSpaceGuard(model, eps=1e-2, on_device=on_device)
            free = torch.cuda.memory_allocated()
            guard._install({str(i): str(i) for i in range(layers)},
                           {str(i): Projector.of_vectors(v, r) for i, (v, r)
                            in enumerate(zip(vectors, ranks, strict=True))})
            held = torch.cuda.memory_allocated() - free
        model.zero_grad(set_to_none=True)
        seen.clear()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        model(x).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        out = [m.weight.grad.clone() for m in model]
        if guard is not None:
            guard.remove()
        return out, held, peak

    _, _, plain_peak = grads(None)
    on_dev, dev_held, dev_peak = grads(True)
    on_host, host_held, host_peak = grads(False)
    for h in hooks:
        h.remove()
    same = all(torch.equal(a, b) for a, b in zip(on_dev, on_host, strict=True))
    leak, before = [], []
    for i, (v, r) in enumerate(zip(vectors, ranks, strict=True)):
        b = v[:, :r].to(device)
        xi, dy = (t.detach().reshape(-1, t.shape[-1]) for t in seen[i])
        x32 = xi.float()
        old = dy.T @ (x32 - (x32 @ b) @ b.T).to(dy.dtype)  # the fp32 path, rounded to bf16
        before.append(float((old.float() @ b).norm() / old.float().norm()))
        leak.append(float((on_host[i].float() @ b).norm() / on_host[i].float().norm()))
    two = 2 * max(width - r for r in ranks) * width * 2
    ok = same and host_held == 0 and host_peak - dev_peak <= two and \
        max(leak) <= max(2 * max(before), 1e-3)
    return (name, "ok" if ok else "FAIL",
            f"{layers} x {width}-wide bf16 layers, {tokens} tokens: gradients equal to bases on "
            f"the device: {same}; held between steps {host_held / 2**20:.0f} MiB (on the "
            f"device: {dev_held / 2**20:.0f} MiB); backward's peak {host_peak / 2**20:.0f} MiB "
            f"vs {dev_peak / 2**20:.0f} MiB on the device, {plain_peak / 2**20:.0f} MiB "
            f"unguarded (bound: +{two / 2**20:.0f} MiB, two layers' projectors); gradient in "
            f"the protected span: at most {max(leak):.1e} (fp16 complement) vs "
            f"{max(before):.1e} (fp32 projection rounded to bf16)")


def tune_projection(device: str, logdir: Path, rows: list) -> list[str]:
    """Time the rank-1 projection's launch shapes (bench/tune_projection.py); returns the
    best as bench.optimizer arguments, so one run both tunes and measures the step. The CPU
    dry run runs two candidates on small shapes in Triton's interpreter."""
    gpu = device.startswith("cuda")
    args = [] if gpu else ["--shrink", "128", "--layers", "1", "--quick"]
    env = {**os.environ} if gpu else {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "bench.tune_projection", "--device", device,
                          *args], capture_output=True, text=True, cwd=ROOT, env=env)
    (logdir / "tune_projection.md").write_text(out.stdout + out.stderr)
    best = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("best:")]
    ok = out.returncode == 0 and best
    rows.append(("projection launch shapes", "ok" if ok else "FAIL",
                 " ".join(best[0][1:]) + "; table in tune_projection.md" if ok else
                 out.stderr[-300:].replace("\n", " ")))
    return best[0] if ok else []


def cotrain(device: str, logdir: Path) -> tuple[str, str, str]:
    """Co-training side by side (bench/cotrain.py): a separate trainer copy with AdamW and a
    weight sync vs APOLLO-Mini in place, on Llama-3-8B shapes (the dry run: tiny ones). Its
    progress streams into this log, so a run cut short shows how far it got."""
    gpu = device.startswith("cuda")
    if gpu:
        torch.cuda.empty_cache()  # this process's cached blocks are the bench's to use
    limit = 300  # on a GPU its optional rows start only within 200 s
    t0 = time.perf_counter()
    try:
        code = subprocess.run([sys.executable, "-m", "bench.cotrain", "--device", device,
                               "--logdir", str(logdir)], cwd=ROOT, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        return ("co-training bench", "FAIL", f"stopped after {limit} s; the rows it finished "
                "are in cotrain.md")
    table = logdir / "cotrain.md"
    head = ", ".join(table.read_text().split(", ")[:2]) if table.exists() else "no table"
    return ("co-training bench", "ok" if code == 0 else "FAIL",
            f"{head.removeprefix('Co-training: ')}, {time.perf_counter() - t0:.0f} s; "
            "tables in cotrain.md")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    gpu = a.device.startswith("cuda")
    logdir = Path(a.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    card = torch.cuda.get_device_name() if gpu else "CPU (dry run)"

    model_dir = logdir / "model"
    config, row = make_model(model_dir, gpu)
    rows.append(row)

    owner = OwnerProcess(model_dir, logdir / "export", a.device, logdir / "owner.log")
    export = None
    try:
        export = attach(logdir / "export", timeout=120)
        model = build_model(export.tensors, config)
        views = all(shares_storage(p, export.tensors) for p in model.parameters())
        rows.append(("map onto owner's tensors", "ok" if views else "FAIL",
                     f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, "
                     f"{next(model.parameters()).device}"))

        names = [n for n in export.tensors if n.endswith(("qkv_proj.weight", "down_proj.weight"))]
        before = {n: owner.tensor_sum(n) for n in names}
        opt = ApolloMini(param_groups(model, 1e-3, False), lr=1e-3)
        trainer = Trainer(model, opt, Settings(export_dir=str(logdir / "export"), batch_size=4,
                                               max_steps_per_batch=1),
                          pad_id=0, coordinator=VllmCoordinator(export))
        g = torch.Generator().manual_seed(0)
        examples = []
        for _ in range(4 * a.steps):
            ids = torch.randint(0, config.vocab_size, (128,), generator=g).tolist()
            examples.append(Encoded(ids, [-100] * 64 + ids[64:]))
        trainer.start()
        t0 = time.perf_counter()
        trainer.submit(examples)
        while trainer.queued:
            time.sleep(0.05)
        trainer.stop()
        seconds = time.perf_counter() - t0
        seen = [n for n in names if owner.tensor_sum(n) != before[n]]
        agree = all(abs(owner.tensor_sum(n) - export.tensors[n].double().sum().item()) <= 1e-6 *
                    max(1.0, abs(owner.tensor_sum(n))) for n in names)
        ok = trainer.stats.optimizer_steps == a.steps and len(seen) == len(names) and agree
        rows.append(("train in place, owner sees updates", "ok" if ok else "FAIL",
                     f"{trainer.stats.optimizer_steps} steps in {seconds:.1f} s, write "
                     f"{1e3 * (trainer.stats.last_write_seconds or 0):.1f} ms/step, "
                     f"{len(seen)}/{len(names)} tensors changed in the owner"))

        t0 = time.perf_counter()
        ck = Checkpointer(model_dir, dict(model.named_parameters()))
        result = ck.sync()
        on_disk = load_file(model_dir / "model.safetensors")
        live = dict(model.named_parameters())
        equal = all(torch.equal(t, live[n].detach().cpu()) for n, t in on_disk.items())
        rows.append(("checkpoint from device memory", "ok" if equal and result.bytes_written
                     else "FAIL", f"{result.tensors} tensors, {result.bytes_written / 2**20:.0f}"
                     f" MiB in {result.seconds:.2f} s (incl. start {time.perf_counter() - t0:.1f}"
                     " s)"))
        del model, opt, trainer, ck, live
    finally:
        export = None
        owner.close()

    for check in (graph_check, agreement_check, guard_staging_check):
        try:
            rows.append(check(a.device))
        except Exception as exc:  # report it in the table and go on with the benchmark
            rows.append((check.__name__, "FAIL", f"{type(exc).__name__}: {exc}"[:300]))

    tiles = tune_projection(a.device, logdir, rows)
    bench_log = logdir / "optimizer_bench.md"
    layers = "8" if gpu else "1"
    out = subprocess.run([sys.executable, "-m", "bench.optimizer", "--device", a.device,
                          "--layers", layers, "--steps", "10" if gpu else "1",
                          "--shrink", "1" if gpu else "4", *tiles],
                         capture_output=True, text=True, cwd=ROOT)
    bench_log.write_text(out.stdout + out.stderr)
    rows.append(("optimizer bench", "ok" if out.returncode == 0 else "FAIL",
                 f"{layers} layer(s); table in {bench_log.name}"))

    rows.append(cotrain(a.device, logdir))

    print((logdir / "tune_projection.md").read_text())
    print(out.stdout)
    if (logdir / "cotrain.md").exists():
        print((logdir / "cotrain.md").read_text())
    print(f"GPU check on {card}; logs in {logdir}")
    print("| check | result | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    allowed = {"ok"} if gpu else {"ok", "n/a"}  # on a GPU every check must run
    sys.exit(0 if all(r[1] in allowed for r in rows) else 1)


if __name__ == "__main__":
    main()
