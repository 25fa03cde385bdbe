"""The bodies of the CLI commands (argparse namespaces in, library calls, printed results out)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch


def _device(name: str) -> torch.device:
    # Not training's resolve_device: its advice (--set train.device=cpu) is not an option here.
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available: use --device cpu (or auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    from ..data.sampler import eval_target_count
    from ..training.evaluate import evaluate_nll, report
    from ..training.runs import load_run

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}; leave it out to use training's")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0 (0: the whole split), got {args.max_tokens}")
    device = _device(args.device)
    run = load_run(args.run_dir, device)
    data = run.dataset(args.data)
    tokens = data.split(args.split)
    cfg = run.config.train
    example_length = data.meta.example_length
    started = time.perf_counter()
    nll, n = evaluate_nll(run.model, tokens, seq_len=cfg.seq_len, batch_size=args.batch_size or cfg.batch_size,
                          example_length=example_length, max_tokens=args.max_tokens or None, device=device)
    whole = n == eval_target_count(len(tokens), seq_len=cfg.seq_len, example_length=example_length)
    rep = report(nll, data.meta.metric, data.meta.splits[args.split], whole_split=whole)
    line = {"checkpoint": str(run.checkpoint), "split": args.split, "tokens": n, "whole_split": whole, **rep}
    results = Path(args.run_dir) / "eval.jsonl"
    if Path(args.run_dir).is_dir() and (Path(args.run_dir) / "checkpoints").is_dir():
        with open(results, "a") as f:
            f.write(json.dumps(line) + "\n")
    print(f"{args.split} ({n:,} tokens, {time.perf_counter() - started:.1f}s, step {run.state['step']}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in rep.items()))
    if "word_ppl_estimate" in rep:
        print("word_ppl_estimate: the whole split's tokens per word applied to part of it; evaluate without "
              "--max-tokens for word_ppl")
    return 0


def _check_sampling(args) -> None:
    if args.tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {args.tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1] (1: off), got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: off), got {args.top_k}")


def cmd_sample(args) -> int:
    from ..data.registry import load_codec
    from ..data.sampler import START_TOKEN
    from ..generation import sample
    from ..training.runs import load_run

    _check_sampling(args)
    device = _device(args.device)
    run = load_run(args.run_dir, device)
    data = run.dataset(args.data)
    codec = load_codec(data)
    example_length = data.meta.example_length
    if args.prompt is None:
        split = data.split("test")
        n = min(64, len(split))
        if example_length:
            n = min(n, max(0, example_length - args.tokens))  # leave room for --tokens in the image
        prompt_ids = [int(t) for t in split[:n]]
    elif codec.is_text:
        prompt_ids = codec.encode(args.prompt)
    else:
        try:
            prompt_ids = codec.encode(args.prompt)
        except ValueError:
            raise ValueError("--prompt of an image run is pixel values (0-255) separated by spaces, "
                             f"got {args.prompt[:40]!r}") from None
    vocab = run.config.model.vocab_size
    if any(not 0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"--prompt holds ids outside the model's vocabulary [0, {vocab})")
    if example_length:
        if len(prompt_ids) + args.tokens > example_length:
            raise ValueError(f"--prompt ({len(prompt_ids)} values) plus --tokens {args.tokens} is more than one "
                             f"image ({example_length} values): lower --tokens to at most "
                             f"{max(0, example_length - len(prompt_ids))}")
        # Training reads an image as START_TOKEN and then its values (sampler.py): value i sits at
        # position i + 1, so the prompt must start the same way, empty or not.
        model_ids = [START_TOKEN] + prompt_ids
    else:
        # An empty text prompt starts from token 0 (a NUL byte, or PG-19's <eos>).
        model_ids = prompt_ids or [0]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.tensor([model_ids], dtype=torch.long, device=device)
    out = sample(run.model, prompt, args.tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, generator=generator)
    new = out[0, len(model_ids):].tolist()
    if codec.is_text:
        print(codec.decode(prompt_ids) + codec.decode(new))
    else:
        print(codec.decode(new))
    return 0


def cmd_plot(args) -> int:
    from ..data.registry import load_codec
    from ..data.sampler import START_TOKEN
    from ..training.plots import cluster_summary, plot_clusters, plot_losses, routing_layers, routing_membership
    from ..training.runs import load_run

    if args.length < 1:
        raise ValueError(f"--length must be >= 1, got {args.length}")
    run_dir = Path(args.run_dir)
    # Everything is checked before anything is written: a mistyped RUN_DIR must not create folders.
    run = load_run(run_dir)
    data = run.dataset(args.data)
    layers = routing_layers(run.model)
    if args.layer is not None and args.layer not in layers:
        raise ValueError(f"--layer {args.layer} has no routing heads; routing layers: {layers}")
    out = Path(args.out or run_dir / "plots")
    split = data.split("valid" if "valid" in data.meta.splits else "train")
    example_length = data.meta.example_length
    length = min(args.length, run.config.model.max_seq_len, example_length or len(split))
    codec = load_codec(data)
    if example_length:
        # The model sees an image as START_TOKEN and then its values (sampler.py), so does the picture.
        ids = [START_TOKEN] + [int(t) for t in split[: length - 1]]
        labels = ["start"] + [str(t) for t in ids[1:]]
    else:
        ids = [int(t) for t in split[:length]]
        labels = [codec.decode([t]) if codec.is_text else str(t) for t in ids]
    tokens = torch.tensor([ids], dtype=torch.long)
    written = [plot_losses(run_dir, out / "loss.png")]
    if layers:
        written.append(plot_clusters(run.model, tokens, out / "clusters.png", layer=args.layer, labels=labels))
        layer = args.layer if args.layer is not None else layers[-1]
        sizes = cluster_summary(routing_membership(run.model, tokens, layer).numpy())
        print(f"positions per cluster (layer {layer}, one list per routing head): {sizes}")
    else:
        print("the model has no routing heads: no cluster picture")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
