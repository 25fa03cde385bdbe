"""The command line end to end on tiny data, and every bad input: one line, exit code 2, nothing lost."""
import json
import math
import subprocess
import sys

import pytest

from routeformer.cli.main import main
from tests.training.helpers import TINY, corpus_file

SETS = [arg for item in TINY for arg in ("--set", item)]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """prepare + train 4 steps once for the module; returns (data dir, run dir)."""
    root = tmp_path_factory.mktemp("cli")
    corpus_file(root / "corpus.txt")
    assert main(["prepare", "stdlib", "--from-file", str(root / "corpus.txt"), "--out", str(root / "data")]) == 0
    assert main(["train", "--preset", "tiny", "--data", str(root / "data"), "--out", str(root / "run"), *SETS,
                 "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2"]) == 0
    return root / "data", root / "run"


def test_train_writes_a_run(trained):
    _, run_dir = trained
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    assert any("bpc" in x for x in lines)


def test_eval_sample_plot(trained, capsys):
    _, run_dir = trained
    code, out, _ = run(capsys, "eval", run_dir, "--split", "test")
    assert code == 0 and "bpc" in out
    assert json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])["split"] == "test"
    code, out, _ = run(capsys, "sample", run_dir, "--prompt", "def ", "--tokens", "12", "--top-p", "0.9")
    assert code == 0 and out.startswith("def ")
    code, out, _ = run(capsys, "plot", run_dir, "--length", "48")
    assert code == 0
    for name in ("loss.png", "clusters.png"):
        png = run_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_sample_is_reproducible_with_a_seed(trained, capsys):
    _, run_dir = trained
    outs = [run(capsys, "sample", run_dir, "--tokens", "10", "--seed", "3")[1] for _ in range(2)]
    assert outs[0] == outs[1]


@pytest.mark.parametrize("command", ["prepare", "train", "eval", "sample", "plot", "list"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    parser_actions = [a for a in _subparser(command)._actions if a.option_strings or a.dest != "help"]
    assert all(a.help for a in parser_actions), [a.dest for a in parser_actions if not a.help]
    assert "usage: routeformer " + command in out


def _subparser(command):
    import argparse

    from routeformer.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "routeformer", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "prepare" in done.stdout and "sample" in done.stdout


def _expect_error(capsys, fragment, *argv):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("routeformer "), err
    assert "Traceback" not in err
    assert fragment in err, err
    return err


def test_bad_inputs_exit_2_with_one_line(trained, tmp_path, capsys):
    data, run_dir = trained
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    _expect_error(capsys, "did you mean 'tiny'", "train", "--preset", "tiyn")
    _expect_error(capsys, "did you mean enwik8", "prepare", "enwk8")
    _expect_error(capsys, "longer than the model", "train", "--preset", "tiny", "--data", data, *SETS,
                  "--set", "train.seq_len=128", "--out", tmp_path / "r1")
    _expect_error(capsys, "already holds a run", "train", "--preset", "tiny", "--data", data, *SETS,
                  "--out", run_dir)
    _expect_error(capsys, "no checkpoint to resume", "train", "--resume", "--out", tmp_path / "none")
    _expect_error(capsys, "not a prepared dataset", "train", "--preset", "tiny", "--data", tmp_path / "nope",
                  "--out", tmp_path / "r2")
    _expect_error(capsys, "did you mean train.learning_rate", "train", "--preset", "tiny", "--data", data,
                  "--set", "train.lerning_rate=1")
    _expect_error(capsys, "has no split", "eval", run_dir, "--split", "dev")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _expect_error(capsys, "is empty", "prepare", "enwik8", "--from-file", empty, "--out", tmp_path / "e")
    small = tmp_path / "small.txt"
    small.write_bytes(b"tiny")
    _expect_error(capsys, "use a larger file", "prepare", "enwik8", "--from-file", small, "--out", tmp_path / "s")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.tmp").exists()
    corpus_file(tmp_path / "more.txt")
    meta_before = (data / "meta.json").read_bytes()
    _expect_error(capsys, "already holds a prepared dataset", "prepare", "stdlib", "--from-file",
                  tmp_path / "more.txt", "--out", data)
    assert (data / "meta.json").read_bytes() == meta_before
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # failed commands wrote nothing into the existing run


def test_too_small_training_split(tmp_path, capsys):
    corpus_file(tmp_path / "c.txt", n_bytes=400)
    assert main(["prepare", "stdlib", "--from-file", str(tmp_path / "c.txt"), "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    _expect_error(capsys, "fewer than", "train", "--preset", "tiny", "--data", tmp_path / "d", *SETS,
                  "--set", "train.seq_len=512", "--set", "model.max_seq_len=1024", "--out", tmp_path / "r")


def test_vocab_mismatch(tmp_path, capsys):
    words = tmp_path / "wt"
    words.mkdir()
    vocab = [f"w{i}" for i in range(300)]
    for split in ("train", "valid", "test"):
        (words / f"wiki.{split}.tokens").write_text(" ".join(vocab) + "\n")
    assert main(["prepare", "wikitext103", "--from-file", str(words), "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    _expect_error(capsys, "model.vocab_size=301", "train", "--preset", "tiny", "--data", tmp_path / "d", *SETS,
                  "--out", tmp_path / "r")


def test_corrupt_and_mismatched_checkpoints(trained, tmp_path, capsys):
    import shutil

    _, run_dir = trained
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    weights = copy / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _expect_error(capsys, "delete", "eval", copy)
    _expect_error(capsys, "delete", "train", "--resume", "--out", copy)
    shutil.rmtree(copy / "checkpoints" / "step_000004")  # the fix the message names
    assert run(capsys, "eval", copy, "--max-tokens", "64")[0] == 0
    state_path = copy / "checkpoints" / "step_000002" / "state.json"
    state = json.loads(state_path.read_text())
    state["config"]["model"]["dim"] = 64
    state["config"]["model"]["head_dim"] = None
    state_path.write_text(json.dumps(state))
    _expect_error(capsys, "model.safetensors", "eval", copy)
    state_path.write_text("{not json")
    _expect_error(capsys, "corrupt", "sample", copy)


def test_eval_input_errors(trained, capsys, monkeypatch):
    _, run_dir = trained
    for bad in ("-1", "0"):  # used to end in ZeroDivisionError (-1) or silently mean "training's" (0)
        _expect_error(capsys, "--batch-size must be >= 1", "eval", run_dir, "--batch-size", bad)
    _expect_error(capsys, "--max-tokens must be >= 0", "eval", run_dir, "--max-tokens", "-5")
    assert run(capsys, "eval", run_dir, "--batch-size", "3", "--max-tokens", "96")[0] == 0
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("eval", "sample"):
        err = _expect_error(capsys, "use --device cpu", command, run_dir, "--device", "cuda")
        assert "train.device" not in err  # training's advice is no option of eval or sample


def test_sample_input_errors_and_tiny_temperatures(trained, capsys):
    _, run_dir = trained
    greedy = run(capsys, "sample", run_dir, "--prompt", "def ", "--tokens", "8", "--temperature", "0")
    assert greedy[0] == 0
    for t in ("1e-40", "1e-300"):  # used to overflow to inf, then NaN probabilities
        assert run(capsys, "sample", run_dir, "--prompt", "def ", "--tokens", "8", "--temperature", t) == greedy
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                        ("--top-p", "0"), ("--top-p", "1.5"), ("--top-k", "-1"), ("--tokens", "-1")):
        _expect_error(capsys, flag + " must be", "sample", run_dir, flag, value)


def test_plot_errors_create_nothing(trained, tmp_path, capsys):
    _, run_dir = trained
    _expect_error(capsys, "does not exist", "plot", tmp_path / "no" / "run")
    _expect_error(capsys, "does not exist", "plot", tmp_path / "no" / "run", "--out", tmp_path / "pics")
    _expect_error(capsys, "--layer 7 has no routing heads", "plot", run_dir, "--layer", "7", "--out", tmp_path / "p")
    _expect_error(capsys, "--length must be >= 1", "plot", run_dir, "--length", "0", "--out", tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_prepare_max_bytes_is_checked(tmp_path, capsys):
    corpus_file(tmp_path / "c.txt")
    _expect_error(capsys, "--max-bytes must be a positive number", "prepare", "stdlib", "--max-bytes", "0",
                  "--out", tmp_path / "a")
    _expect_error(capsys, "smaller than the corpus's first file", "prepare", "stdlib", "--max-bytes", "10",
                  "--out", tmp_path / "b")
    _expect_error(capsys, "caps only the built-in stdlib corpus", "prepare", "stdlib", "--max-bytes", "1000",
                  "--from-file", tmp_path / "c.txt", "--out", tmp_path / "c")
    _expect_error(capsys, "caps only the built-in stdlib corpus", "prepare", "text8", "--max-bytes", "1000",
                  "--from-file", tmp_path / "c.txt", "--out", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_resume_help_names_what_must_stay_the_same(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the same train.max_steps and schedule" in text


def test_word_perplexity_is_labelled_an_estimate_on_part_of_the_split(trained, tmp_path, capsys):
    import shutil

    data, run_dir = trained
    words = tmp_path / "words"
    shutil.copytree(data, words)
    meta = json.loads((words / "meta.json").read_text())
    meta["metric"] = "ppl"  # as PG-19's: subword tokens, with the split's word count
    meta["splits"]["test"]["words"] = meta["splits"]["test"]["tokens"] // 4
    (words / "meta.json").write_text(json.dumps(meta))
    code, out, _ = run(capsys, "eval", run_dir, "--data", words, "--max-tokens", "64")
    assert code == 0 and "word_ppl_estimate" in out and "word_ppl " not in out
    part = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert "word_ppl" not in part and part["whole_split"] is False
    code, out, _ = run(capsys, "eval", run_dir, "--data", words)
    whole = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert code == 0 and "word_ppl_estimate" not in out and whole["whole_split"] is True
    assert whole["word_ppl"] == pytest.approx(math.exp(whole["nll"] * meta["splits"]["test"]["tokens"]
                                                       / meta["splits"]["test"]["words"]))


IMAGE = 48  # values per "image" (4 x 4 pixels, RGB): small enough for the tiny model's 64 positions


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """An image dataset (example_length set, as cifar10/imagenet64 write it) and a run trained on it."""
    import numpy as np

    from routeformer.data.stream import DatasetMeta, DatasetWriter

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    writer = DatasetWriter(root / "data", DatasetMeta("cifar10", 256, "uint8", "bpd", example_length=IMAGE))
    for split, n in (("train", 20), ("valid", 2), ("test", 2)):
        # Values 1..255 so that a start token (0) in a model input cannot be a pixel of the split.
        writer.append(split, rng.integers(1, 256, n * IMAGE, dtype=np.uint8))
    writer.commit()
    sets = [arg for item in TINY if not item.startswith("train.seq_len") for arg in ("--set", item)]
    assert main(["train", "--preset", "tiny", "--data", str(root / "data"), "--out", str(root / "run"), *sets,
                 "--set", f"train.seq_len={IMAGE}", "--set", "train.max_steps=2"]) == 0
    return root / "data", root / "run"


def test_image_sampling_starts_with_the_start_token(image_run, capsys, monkeypatch):
    import torch

    from routeformer import generation
    from routeformer.data import PreparedDataset
    from routeformer.training.runs import load_run

    data, run_dir = image_run
    prompts = []
    real_sample = generation.sample

    def spy(model, prompt, *a, **kw):
        prompts.append(prompt[0].tolist())
        return real_sample(model, prompt, *a, **kw)

    monkeypatch.setattr(generation, "sample", spy)
    code, out, _ = run(capsys, "sample", run_dir, "--prompt", "5 6 7", "--tokens", "4", "--temperature", "0")
    # Training puts pixel i at position i + 1, after a start token 0 (RandomBatchSampler).
    assert code == 0 and prompts[-1] == [0, 5, 6, 7]
    model = load_run(run_dir).model
    expected = real_sample(model, torch.tensor([[0, 5, 6, 7]]), 4, temperature=0)[0, 4:].tolist()
    assert [int(v) for v in out.split()] == expected
    code, out, _ = run(capsys, "sample", run_dir, "--tokens", "6", "--temperature", "0")
    test = [int(v) for v in PreparedDataset(data).split("test")]
    assert code == 0 and prompts[-1] == [0] + test[: IMAGE - 6] and len(out.split()) == 6
    _expect_error(capsys, "more than one image", "sample", run_dir, "--prompt", "1 2", "--tokens", str(IMAGE - 1))
    _expect_error(capsys, "pixel values", "sample", run_dir, "--prompt", "1 x")
    _expect_error(capsys, "outside the model's vocabulary", "sample", run_dir, "--prompt", "256")


def test_image_cluster_plot_starts_with_the_start_token(image_run, capsys, monkeypatch):
    from routeformer.data import PreparedDataset
    from routeformer.training import plots

    data, run_dir = image_run
    seen = {}
    real_plot = plots.plot_clusters

    def spy(model, tokens, out, **kw):
        seen["tokens"], seen["labels"] = tokens[0].tolist(), kw["labels"]
        return real_plot(model, tokens, out, **kw)

    monkeypatch.setattr(plots, "plot_clusters", spy)
    code, _, _ = run(capsys, "plot", run_dir)
    valid = [int(v) for v in PreparedDataset(data).split("valid")]
    assert code == 0 and seen["tokens"] == [0] + valid[: IMAGE - 1]  # one image, as the model reads it
    assert seen["labels"][0] == "start" and seen["labels"][1:] == [str(v) for v in valid[: IMAGE - 1]]
    assert (run_dir / "plots" / "clusters.png").is_file()
