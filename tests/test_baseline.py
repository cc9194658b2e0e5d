"""Better than what? The TF-IDF + logistic regression baseline every run fits (baseline.py) on the run's own splits,
its figures checked against scikit-learn run here; --no-baseline; the warning when the model does not beat it; the
step floor (--min-steps) for small data; ties of the metric for best broken by validation loss."""
import json

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score

import train as train_module
from config import resolve
from data import load_data
from toy import toy_examples, write_csv
from train import enough_epochs, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baseline")
    return (str(write_csv(folder / "train.csv", toy_examples(160, seed=1))),
            str(write_csv(folder / "test.csv", toy_examples(60, seed=2))))


def run_settings(fast, files, tmp_path, **overrides):
    return resolve(**{**fast, "dataset": files[0], "test_file": files[1], "epochs": 1, "audit": False,
                      "checkpoint_every": 0, "output_dir": str(tmp_path / "out"), **overrides})


def test_the_baseline_is_fitted_on_the_runs_own_splits_and_matches_scikit_learn(fast, files, tmp_path, capsys):
    cfg = run_settings(fast, files, tmp_path)
    metrics = train(cfg)
    reference = metrics["baseline"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["baseline"] == reference
    assert reference["n"] == metrics["test"]["n"] == 60 and reference["seconds"] >= 0
    # independently: the same rows (the run's seeded split of train.csv; test.csv as it is), scikit-learn alone
    data, names = load_data(cfg)
    texts = {split: list(data[split]["text"]) for split in data}
    labels = {split: np.array(data[split]["label"]) for split in data}
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=50_000).fit(texts["train"])
    rows = {split: vectorizer.transform(texts[split]) for split in data}
    tried = {c: LogisticRegression(C=c, max_iter=1000).fit(rows["train"], labels["train"]) for c in (1.0, 10.0, 100.0)}
    on_val = {c: accuracy_score(labels["validation"], m.predict(rows["validation"])) for c, m in tried.items()}
    best = max(on_val, key=lambda c: (on_val[c], -c))  # of equal scores, the stronger regularization
    assert reference["C"] == best
    assert reference["accuracy"] == pytest.approx(accuracy_score(labels["test"], tried[best].predict(rows["test"])))
    assert f"baseline (TF-IDF + logistic regression) {reference['accuracy']:.4f}" in capsys.readouterr().out
    # how sure: the observed difference lies inside its paired bootstrap interval
    interval = reference["difference"]
    assert interval["low"] - 1e-4 <= metrics["test"]["accuracy"] - reference["accuracy"] <= interval["high"] + 1e-4
    assert interval["resamples"] == 1000 and interval["confidence"] == 0.95


def test_no_baseline_leaves_it_out(fast, files, tmp_path, capsys):
    metrics = train(run_settings(fast, files, tmp_path, baseline=False))
    assert metrics["baseline"] is None and metrics["baseline_skipped"] == "--no-baseline"
    captured = capsys.readouterr()
    for line in ("Baseline:", "· baseline (", "Baseline skipped", "does not beat"):
        assert line not in captured.out and line not in captured.err


def test_a_model_worse_than_its_baseline_says_so(fast, files, tmp_path, capsys):
    metrics = train(run_settings(fast, files, tmp_path, lr=1e-12))  # learns nothing: the baseline is far ahead
    assert metrics["test"]["accuracy"] < metrics["baseline"]["accuracy"]
    err = capsys.readouterr().err
    assert "Warning: the model does not beat the TF-IDF + logistic regression baseline on test accuracy" in err
    assert "--epochs 2 --patience 2" in err and "--lr (now 1e-12)" in err


def test_the_step_floor_raises_the_epochs_of_small_data_only():
    cfg = resolve(epochs=3, min_steps=300)
    assert enough_epochs(cfg, 20).epochs == 15  # 400 rows: 20 batches of 16 an epoch
    assert enough_epochs(cfg, 1563) is cfg  # IMDB's 25,000 rows: already thousands of steps, left as it is
    assert enough_epochs(resolve(epochs=3, min_steps=0), 20).epochs == 3  # --min-steps 0: off


def test_the_step_floors_default_is_higher_for_label_sets():
    from config import settle
    assert settle(resolve(), multi_label=False).min_steps == 300
    assert settle(resolve(), multi_label=True).min_steps == 600  # 33 mostly rare labels: 0.8208 at 360 steps, 0.8315 at 600
    assert settle(resolve(min_steps=100), multi_label=True).min_steps == 100  # one given is kept
    assert settle(resolve(min_steps=0), multi_label=True).min_steps == 0


def test_a_run_on_tiny_data_trains_the_floors_steps(fast, files, tmp_path, capsys, no_step_floor, monkeypatch):
    monkeypatch.setattr(train_module, "enough_epochs", no_step_floor)  # the real floor (conftest turns it off)
    metrics = train(run_settings(fast, files, tmp_path, min_steps=24, baseline=False))  # 144 training rows: 9 steps an epoch
    assert metrics["config"]["epochs"] == 3
    assert [r["epoch"] for r in metrics_log(tmp_path)] == [1, 2, 3]
    assert "9 optimizer steps an epoch, so 3 epochs instead of 1 to reach --min-steps 24" in capsys.readouterr().out


def metrics_log(tmp_path):
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


def test_min_steps_refuses_a_negative_value():
    from config import UserError
    with pytest.raises(UserError, match=r"--min-steps must be >= 0 \(0 = off\), not -1"):
        resolve(min_steps=-1)


def test_a_tie_of_the_metric_for_best_is_broken_by_validation_loss(monkeypatch, tmp_path):
    """24 validation texts all right after epoch 1 and after epoch 2: the epoch with the lower loss is the best."""
    losses = iter([0.87, 0.09, 0.30])
    monkeypatch.setattr(train_module, "split_logits", lambda *a: ("logits", "labels"))
    monkeypatch.setattr(train_module, "scores", lambda *a: {"accuracy": 1.0, "f1_macro": 1.0, "loss": next(losses)})
    saved = []
    monkeypatch.setattr(train_module, "save_model", lambda *a: saved.append(state["epoch"]))
    monkeypatch.setattr(train_module, "append_to_log", lambda *a: None)
    cfg, state = resolve(metric_for_best="accuracy"), {"best_val": None, "best_score": None, "bad_epochs": 0}
    for epoch in (1, 2, 3):
        state["epoch"] = epoch
        record = {"epoch": epoch, "train_loss": 0.5, "lr": 1e-5, "padding": 0.1}
        run = train_module.Run(cfg=cfg, accelerator=None, state=state, out=tmp_path, loaders={"validation": None},
                               names=["a", "b"])
        train_module.end_of_epoch(run, record, 0)
    assert saved == [1, 2] and state["best_epoch"] == 2 and state["best_val"]["loss"] == 0.09
    assert state["bad_epochs"] == 1


def test_no_lr_given_takes_the_rate_of_the_models_width(fast, files, tmp_path, capsys):
    """The tiny model is 32 wide, narrower than DistilBERT: 1e-4 (train.default_lr), used and recorded."""
    settings = {key: value for key, value in fast.items() if key != "lr"}
    metrics = train(run_settings(settings, files, tmp_path))
    assert metrics["config"]["lr"] == 1e-4
    assert "· lr 0.0001" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert max(r["lr"] for r in log if "lr" in r) <= 1e-4


@pytest.mark.parametrize("model, line", [(0.75, "· level with it"), (0.80, "· ahead by 0.0500"),
                                         (0.70, "· behind by 0.0500")])
def test_the_closing_line_puts_the_model_beside_its_baseline(model, line, capsys):
    import report
    metrics = {"baseline": {"accuracy": 0.75, "model": "TF-IDF + logistic regression"}, "baseline_skipped": None,
               "config": {"metric_for_best": "accuracy", "epochs": 3, "lr": 1e-4, "max_len": 128},
               "test": {"accuracy": model}}
    report.beside_baseline(metrics)
    captured = capsys.readouterr()
    assert line in captured.out
    assert ("does not beat" in captured.err) == (model <= 0.75)  # a tie does not beat it either
    perfect = dict(metrics, baseline={**metrics["baseline"], "accuracy": 1.0}, test={"accuracy": 1.0})
    report.beside_baseline(perfect)
    captured = capsys.readouterr()
    assert "· level with it" in captured.out and "does not beat" not in captured.err  # nothing to try at 1.0


@pytest.mark.parametrize("cut, positions, advised", [(0.35, 512, True), (0.35, 128, False), (0.0, 512, False),
                                                     (0.35, None, True)])
def test_a_longer_max_len_is_advised_only_where_it_would_read_more(cut, positions, advised, capsys):
    """Not when no training text is cut, nor when the model reads no further than --max-len already does."""
    import report
    metrics = {"baseline": {"accuracy": 0.75, "model": "TF-IDF + logistic regression"}, "baseline_skipped": None,
               "config": {"metric_for_best": "accuracy", "epochs": 1, "lr": 1e-4, "max_len": 128},
               "test": {"accuracy": 0.70}}
    report.beside_baseline(metrics, {"truncated": cut}, positions)
    err = capsys.readouterr().err
    assert "a higher --lr (now 0.0001)" in err
    assert ("a longer --max-len (now 128, which cuts 35% of the training texts)" in err) == advised


@pytest.mark.parametrize("multi_label", [False, True])
def test_resampled_metrics_at_weights_of_one_are_the_runs_own(multi_label):
    """paired_difference resamples the very metrics metrics.json reports: at one draw of each text, the same."""
    import torch
    from analysis import as_rows, classification_metrics, label_set_metrics, resampled
    generator, names = torch.Generator().manual_seed(0), list("abcd")
    logits = torch.randn(300, 4, generator=generator)
    labels = (torch.rand(300, 4, generator=generator) < 0.3).int() if multi_label else \
        torch.randint(0, 4, (300,), generator=generator)
    expected = label_set_metrics(labels.numpy(), (logits.sigmoid() >= 0.4).int().numpy(), names) if multi_label \
        else classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), names)
    rows = as_rows(logits, labels, 0.4)
    for metric in ("accuracy", "f1_macro", "f1_micro") if multi_label else ("accuracy", "f1_macro"):
        assert resampled(*rows, metric, np.ones((1, 300)))[0] == pytest.approx(expected[metric])


def test_the_interval_of_a_known_difference_has_the_width_of_its_standard_error():
    """A model right on all 2,000 texts, a baseline on 90%: the difference 0.10, and its standard error
    sqrt(0.1 x 0.9 / 2000) = 0.0067, so the 95% interval is about 0.10 +- 0.013; identical predictions: exactly 0."""
    import torch
    from analysis import as_rows, paired_difference
    labels = torch.arange(2000) % 3
    right = torch.nn.functional.one_hot(labels, 3).float()
    wrong = right.clone()
    wrong[::10] = torch.nn.functional.one_hot((labels[::10] + 1) % 3, 3).float()
    interval = paired_difference(as_rows(right, labels), as_rows(wrong, labels), "accuracy")
    half = 1.96 * (0.1 * 0.9 / 2000) ** 0.5
    assert interval["low"] == pytest.approx(0.1 - half, abs=0.003)
    assert interval["high"] == pytest.approx(0.1 + half, abs=0.003)
    same = paired_difference(as_rows(wrong, labels), as_rows(wrong, labels), "f1_macro")
    assert same["low"] == same["high"] == 0


@pytest.mark.parametrize("low, high, verdict", [(-0.0247, 0.0067, "within the noise"),
                                                (0.0113, 0.0402, "clearly ahead"), (-0.03, -0.001, "clearly behind")])
def test_the_closing_line_says_whether_the_difference_is_beyond_the_noise(low, high, verdict, capsys):
    import report
    interval = {"low": low, "high": high, "confidence": 0.95}
    metrics = {"baseline": {"accuracy": 0.75, "model": "TF-IDF + logistic regression", "difference": interval},
               "baseline_skipped": None, "test": {"accuracy": 0.76, "n": 445},
               "config": {"metric_for_best": "accuracy", "epochs": 3, "lr": 1e-4, "max_len": 128}}
    report.beside_baseline(metrics)
    assert f"(95% interval {low:+.4f} to {high:+.4f} over 445 test texts, paired bootstrap: {verdict})" \
        in capsys.readouterr().out
    assert verdict in report.better_than_what({**metrics, "baseline": {**metrics["baseline"], "seconds": 1.0}})
