"""The bodies of the CLI commands (argparse namespaces in, library calls, printed results out)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    from ..training.trainer import resolve_device

    return resolve_device(name)


def cmd_list(args) -> int:
    from ..data.registry import DATASETS
    from ..presets import PRESETS

    print("presets:")
    for name, preset in PRESETS.items():
        m = preset.model
        print(f"  {name:30} dataset={preset.dataset:18} depth={m.depth} dim={m.dim} heads={m.heads} "
              f"max_seq_len={m.max_seq_len}")
    print("datasets:")
    for d in DATASETS.values():
        print(f"  {d.name:18} [{d.metric}] {d.description}")
    return 0


def cmd_prepare(args) -> int:
    from ..data import prepare

    out = Path(args.out or f"data/{args.dataset}")
    started = time.perf_counter()
    path = prepare(args.dataset, out, from_file=args.from_file, cache=args.cache, max_bytes=args.max_bytes)
    meta = json.loads((path / "meta.json").read_text())
    splits = ", ".join(f"{k} {v['tokens']:,}" for k, v in meta["splits"].items())
    print(f"prepared {args.dataset} in {path} ({time.perf_counter() - started:.1f}s): vocab {meta['vocab_size']}, "
          f"{meta['dtype']}, tokens: {splits}")
    return 0


def cmd_train(args) -> int:
    from ..training.config import config_from_preset, describe_fields
    from ..training.trainer import train

    if args.help_config:
        print(describe_fields())
        return 0
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        config = None
    else:
        if not args.preset:
            raise ValueError("train needs --preset NAME (see `routeformer list`), or --resume --out RUN_DIR")
        from ..presets import get_preset

        config = config_from_preset(get_preset(args.preset), overrides)
    run_dir = Path(args.out or f"runs/{args.preset}")
    if config is not None:
        from ..data.stream import PreparedDataset

        PreparedDataset(config.data.resolved_path())  # fail before creating anything if the data is missing
    result = train(config, run_dir, resume=args.resume, overrides=overrides if args.resume else [])
    if result.losses:
        print(f"trained {run_dir}: steps {result.steps[0]}..{result.final_step}, loss "
              f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    else:
        print(f"{run_dir} is already at step {result.final_step} (train.max_steps); raise it with --set to go on")
    if result.eval:
        print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))
    return 0


def cmd_eval(args) -> int:
    from ..training.evaluate import evaluate_nll, report
    from ..training.runs import load_run

    device = _device(args.device)
    run = load_run(args.run_dir, device)
    data = run.dataset(args.data)
    tokens = data.split(args.split)
    cfg = run.config.train
    started = time.perf_counter()
    nll, n = evaluate_nll(run.model, tokens, seq_len=cfg.seq_len, batch_size=args.batch_size or cfg.batch_size,
                          example_length=data.meta.example_length, max_tokens=args.max_tokens or None, device=device)
    rep = report(nll, data.meta.metric, data.meta.splits[args.split])
    line = {"checkpoint": str(run.checkpoint), "split": args.split, "tokens": n, **rep}
    results = Path(args.run_dir) / "eval.jsonl"
    if Path(args.run_dir).is_dir() and (Path(args.run_dir) / "checkpoints").is_dir():
        with open(results, "a") as f:
            f.write(json.dumps(line) + "\n")
    print(f"{args.split} ({n:,} tokens, {time.perf_counter() - started:.1f}s, step {run.state['step']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in rep.items()))
    return 0


def cmd_sample(args) -> int:
    from ..data.registry import load_codec
    from ..generation import sample
    from ..training.runs import load_run

    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    device = _device(args.device)
    run = load_run(args.run_dir, device)
    data = run.dataset(args.data)
    codec = load_codec(data)
    if args.prompt is None:
        split = data.split("test")
        prompt_ids = [int(t) for t in split[: min(64, len(split))]]
    else:
        prompt_ids = codec.encode(args.prompt)
    if not prompt_ids:
        prompt_ids = [0]  # an empty prompt starts from token 0 (a NUL byte / <eos> / black sub-pixel)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out = sample(run.model, prompt, args.tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, generator=generator)
    new = out[0, len(prompt_ids):].tolist()
    if codec.is_text:
        print(codec.decode(prompt_ids) + codec.decode(new))
    else:
        print(codec.decode(new))
    return 0


def cmd_plot(args) -> int:
    from ..data.registry import load_codec
    from ..training.plots import cluster_summary, plot_clusters, plot_losses, routing_layers, routing_membership
    from ..training.runs import load_run

    run_dir = Path(args.run_dir)
    out = Path(args.out or run_dir / "plots")
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(run_dir, out / "loss.png")]
    run = load_run(run_dir)
    data = run.dataset(args.data)
    split = data.split("valid" if "valid" in data.meta.splits else "train")
    length = min(args.length, run.config.model.max_seq_len, len(split))
    tokens = torch.tensor([[int(t) for t in split[:length]]], dtype=torch.long)
    if routing_layers(run.model):
        codec = load_codec(data)
        labels = [codec.decode([t]) if codec.is_text else str(t) for t in tokens[0].tolist()]
        written.append(plot_clusters(run.model, tokens, out / "clusters.png", layer=args.layer, labels=labels))
        layer = args.layer if args.layer is not None else routing_layers(run.model)[-1]
        sizes = cluster_summary(routing_membership(run.model, tokens, layer).numpy())
        print(f"positions per cluster (layer {layer}, one list per routing head): {sizes}")
    else:
        print("the model has no routing heads: no cluster picture")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
