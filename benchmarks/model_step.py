"""One training step of a whole Routing Transformer, eager against torch.compile (and its CUDA graphs).

The attention benchmark (attention.py) times one layer's op; this times what a user's training loop
pays per step: a preset's model (default: the paper's enwik8 setting, 12 layers of 4 local + 4 routing
heads, dim 1024, 16 clusters of 512, T = 8192) under bf16 autocast, forward with the commitment loss,
backward, the optimizer and the k-means centroid update, as routeformer's trainer runs it (its
build_optimizer: AdamW, fused on CUDA, or with --optimizer preset the preset's own, Adafactor for the
paper's text presets, whose update is torch's foreach kernels and stays outside any CUDA graph). Modes:
  eager            the model as it is (every op launched from Python)
  compile          torch.compile(model) (inductor; our ops stay opaque custom ops)
  reduce-overhead  torch.compile(model, mode="reduce-overhead"): inductor's CUDA graphs as well
Each mode starts from the same weights and batch, so the first step's losses must agree (printed, and
a mismatch past bf16 noise fails the run); then steps are timed back to back (CUDA events at each
step's start, median after warm-up: a host-bound loop shows as a longer step). Also per mode: compile
time (the first step's wall time), peak memory (from the first step on, so that CUDA-graph pools
recorded in warm-up count; the base model's copy on the device is in every row), graph breaks and cudagraph skips as torch counts them.

    PYTHONPATH=src python benchmarks/model_step.py [--preset enwik8] [--T 8192] [--assign topk,nearest]
        [--modes eager,compile,reduce-overhead] [--optimizer adamw|preset] [--steps 20] [--out model_step.json]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _build(preset: str, T: int, assign: str, device: str):
    from routeformer.model import RoutingTransformerLM
    from routeformer.presets import get_preset

    cfg = dataclasses.replace(get_preset(preset).model, max_seq_len=T, routing_assign=assign, dropout=0.0,
                              embedding_dropout=0.0)
    torch.manual_seed(0)
    model = RoutingTransformerLM(cfg).to(device)
    model.validate_tokens = False  # one host sync per forward otherwise (model.check_tokens)
    return model, cfg


def _step(model, forward, optimizer, x, y, autocast):
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        logits, aux = forward(x, return_aux_loss=True)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    (ce + aux.float()).backward()
    optimizer.step()
    model.update_centroids()
    return ce.detach()


def _run_mode(base, mode, batches, steps, warmup, device, autocast, train_cfg):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = copy.deepcopy(base).train()
    forward = model if mode == "eager" else torch.compile(
        model, mode=None if mode == "compile" else mode)
    from routeformer.training.optim import build_optimizer

    optimizer = build_optimizer(model, train_cfg)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        # From the first step on: CUDA-graph modes allocate their pools while recording (warm-up steps).
        sync()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first = _step(model, forward, optimizer, *batches[0], autocast).item()
    first_s = time.perf_counter() - t0
    for i in range(warmup):
        _step(model, forward, optimizer, *batches[(i + 1) % len(batches)], autocast)
    sync()
    if device == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    times = []
    for i in range(steps):
        if device == "cuda":
            marks[i].record()
        else:
            t = time.perf_counter()
        _step(model, forward, optimizer, *batches[i % len(batches)], autocast)
        if device != "cuda":
            times.append((time.perf_counter() - t) * 1e3)
    if device == "cuda":
        marks[steps].record()
        sync()
        times = [marks[i].elapsed_time(marks[i + 1]) for i in range(steps)]
    counters = torch._dynamo.utils.counters
    breaks = dict(counters["graph_break"])
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    return {"mode": mode, "first_loss": first, "first_step_s": first_s,
            "step_ms": sorted(times)[len(times) // 2], "step_ms_min": min(times),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "graph_breaks": sum(breaks.values()), "graph_break_reasons": list(breaks)[:5],
            "cudagraph_counters": skips}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="enwik8")
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--assign", default="topk,nearest")
    p.add_argument("--modes", default="eager,compile,reduce-overhead")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "preset"],
                   help="adamw (lr 1e-4) or the preset's own optimizer and learning rate")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = args.device
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else (
        lambda: torch.autocast("cpu", enabled=False))
    from routeformer.presets import get_preset
    from routeformer.training.config import TrainConfig

    train_cfg = TrainConfig(**get_preset(args.preset).train) if args.optimizer == "preset" else TrainConfig(
        optimizer="adamw", learning_rate=1e-4)
    rows = []
    for assign in args.assign.split(","):
        base, cfg = _build(args.preset, args.T, assign, device)
        g = torch.Generator(device=device).manual_seed(1)
        batches = [(torch.randint(0, cfg.vocab_size, (args.batch, args.T), device=device, generator=g),
                    torch.randint(0, cfg.vocab_size, (args.batch, args.T), device=device, generator=g))
                   for _ in range(4)]
        params = sum(t.numel() for t in base.parameters())
        for mode in args.modes.split(","):
            try:
                r = _run_mode(base, mode, batches, args.steps, args.warmup, device, autocast, train_cfg)
            except Exception as e:  # one mode failing must not hide the others' numbers
                r = {"mode": mode, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            r.update(assign=assign, preset=args.preset, T=args.T, batch=args.batch, params_M=params / 1e6,
                     optimizer=train_cfg.optimizer)
            if "step_ms" in r:
                r["tokens_per_s"] = args.batch * args.T / r["step_ms"] * 1e3
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                              "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"\n{args.preset}, T={args.T}, batch {args.batch}, "
          f"{rows[0].get('params_M', 0):.0f}M parameters, bf16 autocast, {train_cfg.optimizer}; median step after warm-up")
    print(f"{'assign':<8} {'mode':<16} {'step ms':>8} {'tok/s':>9} {'vs eager':>8} {'1st loss':>9} "
          f"{'compile s':>9} {'MiB':>7} {'breaks':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['assign']:<8} {r['mode']:<16} failed: {r['error'][:90]}")
            continue
        eager = next((e for e in rows if e["assign"] == r["assign"] and e["mode"] == "eager" and "step_ms" in e), None)
        ratio = f"{eager['step_ms'] / r['step_ms']:8.2f}" if eager else f"{'-':>8}"
        mib = f"{r['peak_mib']:7.0f}" if r["peak_mib"] is not None else f"{'-':>7}"
        print(f"{r['assign']:<8} {r['mode']:<16} {r['step_ms']:8.2f} {r['tokens_per_s']:9.0f} {ratio} "
              f"{r['first_loss']:9.4f} {r['first_step_s']:9.1f} {mib} {r['graph_breaks']:6d}")
    # The same weights and batch: the first losses must agree up to bf16 autocast's noise.
    bad = []
    for r in rows:
        eager = next((e for e in rows if e["assign"] == r["assign"] and e["mode"] == "eager" and "first_loss" in e), None)
        if eager and "first_loss" in r and abs(r["first_loss"] - eager["first_loss"]) > 2e-2 * abs(eager["first_loss"]):
            bad.append(f"{r['assign']} {r['mode']}: {r['first_loss']} vs eager {eager['first_loss']}")
    if bad:
        raise SystemExit("first-step losses disagree: " + "; ".join(bad))


if __name__ == "__main__":
    main()
