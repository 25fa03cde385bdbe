"""`routeformer` (also `python -m routeformer`): prepare, train, eval, sample, plot, list.

Thin mains: parse arguments, build configs, call library code. Bad input of any kind ends with one line
`routeformer <command>: error: <what to do>` on stderr and exit code 2 (ROUTEFORMER_DEBUG=1 shows the
traceback instead).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import commands

EPILOG_TRAIN = """examples:
  routeformer prepare stdlib
  routeformer train --preset tiny --out runs/tiny
  routeformer train --preset tiny --set train.learning_rate=3e-4 --set model.depth=2 --out runs/t2
  routeformer train --out runs/tiny --resume --set train.max_steps=600
`routeformer train --help-config` lists every key --set accepts, with its type and default.
A resumed run repeats an uninterrupted one bit for bit only with the same settings: a new
train.max_steps moves the end of the cosine schedule, so the learning rates after the checkpoint
differ from those of a run that was given that max_steps from the start."""


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one line too (argparse prints the whole usage block before them).

    Subparsers are made with the parser's own class, so every command's errors go through here.
    """

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..data.registry import DATASETS

    parser = _Parser(
        prog="routeformer", description="Routing Transformer: prepare data, train, evaluate, sample, plot.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", help="download (or read) a dataset and write memory-mapped token splits",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="datasets:\n" + "\n".join(f"  {d.name:18} {d.description}\n"
                                                          f"  {'':18} --from-file: {d.from_file}"
                                                          for d in DATASETS.values()))
    p.add_argument("dataset", help="dataset name (listed below)")
    p.add_argument("--from-file", metavar="PATH", help="use this local archive/file/folder instead of downloading")
    p.add_argument("--out", metavar="DIR", help="output directory (default: data/DATASET); must not hold a dataset")
    p.add_argument("--cache", metavar="DIR", help="where downloads are kept (default: next to --out, in downloads/)")
    p.add_argument("--max-bytes", type=int, metavar="N", help="stdlib without --from-file only: cap of the built-in "
                   "corpus in bytes, whole files (default: 16 MiB); an error with any other dataset")

    t = sub.add_parser("train", help="train a model from a preset (or resume a run)", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--preset", metavar="NAME", help="named configuration (see `routeformer list`); "
                   "not needed with --resume")
    t.add_argument("--data", metavar="DIR", help="prepared dataset directory (default: data/<preset's dataset>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. train.learning_rate=3e-4, model.depth=4, max_steps=50; "
                        "repeatable; types are checked")
    t.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<preset>); an existing run "
                   "is only continued with --resume")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint; "
                   "bit-for-bit the steps of an uninterrupted run only with the same train.max_steps and "
                   "schedule (a new max_steps changes the cosine schedule's learning rates)")
    t.add_argument("--help-config", action="store_true", help="list every config key with type and default, then exit")

    e = sub.add_parser("eval", help="evaluate a run's newest checkpoint on a split")
    e.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one checkpoint directory)")
    e.add_argument("--split", default="test", help="split to evaluate (default: test)")
    e.add_argument("--data", metavar="DIR", help="prepared dataset (default: the one the run trained on)")
    e.add_argument("--max-tokens", type=int, default=0, metavar="N", help="evaluate the first N tokens only (0: all); "
                   "with N, PG-19's word-level perplexity is reported as word_ppl_estimate")
    e.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="sequences per batch, >= 1 (default: training's)")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default: auto)")

    s = sub.add_parser("sample", help="generate text from a run's newest checkpoint (nucleus sampling)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or one checkpoint directory)")
    s.add_argument("--prompt", default=None, help="text to continue, or for an image run pixel values separated by "
                   "spaces (default: the first 64 tokens of the test split)")
    s.add_argument("--tokens", type=int, default=200, metavar="N", help="tokens to generate (default: 200)")
    s.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature, finite and >= 0; 0 = greedy, and any tiny T > 0 tends to it")
    s.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus mass in (0, 1] (default: 0.9)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (0: off)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    s.add_argument("--data", metavar="DIR", help="prepared dataset whose tokenizer to use (default: the run's)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run (default: auto)")

    pl = sub.add_parser("plot", help="write loss curves and a routing-cluster picture as PNG")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="run directory")
    pl.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")
    pl.add_argument("--layer", type=int, default=None, help="routing layer to draw (default: every routing layer)")
    pl.add_argument("--length", type=int, default=256, metavar="T", help="sample sequence length (default: 256)")
    pl.add_argument("--data", metavar="DIR", help="prepared dataset (default: the run's)")

    sub.add_parser("list", help="list presets and datasets")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except KeyboardInterrupt:
        print(f"routeformer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        # OSError: a path that is a folder where a file is needed, unreadable, or on a full disk.
        if os.environ.get("ROUTEFORMER_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"routeformer {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
