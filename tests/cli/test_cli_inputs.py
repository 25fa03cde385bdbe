"""More bad input on the command line: argparse's own errors, --from-file paths, --set values of the
wrong type and a run directory that is a file. Each: one line on stderr, exit code 2, nothing written."""
import pytest

from routeformer.cli.main import main
from tests.training.helpers import corpus_file


def _one_line_error(capsys, argv, fragment):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse's errors leave through parser.exit
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("routeformer"), err
    assert "Traceback" not in err and "usage:" not in err, err
    assert fragment in err, err
    return err


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "RUN", "--tokens", "abc"], "routeformer sample: error: argument --tokens: invalid int value"),
    (["eval"], "routeformer eval: error: the following arguments are required: RUN_DIR"),
    (["frob"], "invalid choice: 'frob'"),
    ([], "required: COMMAND"),
    (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["eval", "RUN", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_usage_errors_are_one_line_too(capsys, argv, fragment):
    err = _one_line_error(capsys, argv, fragment)
    assert "--help" in err  # where the usage went


def test_from_file_that_is_missing_or_a_folder(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("x" * 1000)
    for name in ("stdlib", "enwik8", "text8"):  # used to end in a traceback (IsADirectoryError), exit 1
        _one_line_error(capsys, ["prepare", name, "--from-file", folder, "--out", tmp_path / name],
                        f"--from-file {folder} is a directory, but {name} reads one file")
    for name in ("stdlib", "cifar10"):  # stdlib's used to say only "[Errno 2] No such file or directory"
        _one_line_error(capsys, ["prepare", name, "--from-file", tmp_path / "nope", "--out", tmp_path / "o"],
                        f"--from-file {tmp_path / 'nope'} does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("item, fragment", [
    ("model.depth=abc", "--set model.depth=abc: expected an integer, got 'abc' (the field's type is int)"),
    ("train.learning_rate=fast", "expected a number, got 'fast' (the field's type is float)"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number"),
    ("train.grad_clip=inf", "train.grad_clip must be a finite number"),
    ("adam_betas=0.9,1.5", "train.adam_betas must be two numbers in [0, 1)"),
    ("model.head_dim=x", "(the field's type is int | None)"),
])
def test_set_values_of_the_wrong_type(tmp_path, capsys, item, fragment):
    _one_line_error(capsys, ["train", "--preset", "tiny", "--data", tmp_path, "--set", item,
                             "--out", tmp_path / "run"], fragment)
    assert list(tmp_path.iterdir()) == []


def test_run_directory_that_is_a_file(tmp_path, capsys):
    from routeformer.data import prepare

    data = prepare("stdlib", tmp_path / "data", from_file=corpus_file(tmp_path / "c.txt"))
    (tmp_path / "notes").write_text("mine")
    _one_line_error(capsys, ["train", "--preset", "tiny", "--data", data, "--set", "train.device=cpu",
                             "--out", tmp_path / "notes"], "is a file, not a run directory")
    assert (tmp_path / "notes").read_text() == "mine"


def test_demo_runs_prepare_train_eval_plot_sample_on_the_builtin_corpus(tmp_path, monkeypatch, capsys):
    """`make demo`'s wiring (the real run takes minutes): the commands, in order, on CPU, and each echoed
    so that it can be pasted back into a shell."""
    import shlex

    from routeformer.cli import demo

    calls = []
    monkeypatch.setattr(demo, "cli", lambda argv: calls.append(argv) or 0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROUTEFORMER_DEMO_SECONDS", "7")
    assert demo.main() == 0
    assert [c[0] for c in calls] == ["prepare", "train", "eval", "plot", "sample"]
    assert calls[0] == ["prepare", "stdlib", "--out", "data/stdlib"]  # the built-in corpus, no network
    train = calls[1]
    assert train[:3] == ["train", "--preset", "tiny"] and "train.device=cpu" in train
    assert "train.time_budget_s=7" in train
    assert all("--device" in c and "cpu" in c for c in calls[2:5:2])  # eval and sample on CPU too
    echoed = [line[len("$ routeformer "):] for line in capsys.readouterr().out.splitlines()
              if line.startswith("$ routeformer ")]
    assert [shlex.split(line) for line in echoed] == calls  # "--prompt 'class '" keeps its space
