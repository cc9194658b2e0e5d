"""Is it good enough? errors.jsonl, suspect_labels.jsonl, calibration (ECE, temperature), accuracy at coverage and
predict.py --min-confidence, on the toy task (tests/toy.py) learned by the tiny model."""
import collections
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from analysis import accuracy_at_coverage, calibrate, ece, fit_temperature, nll, suspects
from conftest import ROOT
from config import resolve
from data import load_data, make_loaders, tokenize
from toy import NEGATIVE, POSITIVE, toy_examples, unsure_pairs, write_csv
from train import split_logits, train

# Clear examples with the wrong label: what the label audit should find (12 land in the training split and 2 in the
# validation split, where they are the mistakes that the temperature is fitted to).
MISLABELED = [(f"this film was {a} and {b} really {c}", "neg")
              for a, b, c in itertools.islice(itertools.combinations(POSITIVE, 3), 0, 49, 7)] + \
             [(f"the plot was {a} and {b} very {c}", "pos")
              for a, b, c in itertools.islice(itertools.combinations(NEGATIVE, 3), 0, 49, 7)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    train_csv = write_csv(folder / "train.csv", toy_examples(400, seed=1) + MISLABELED)
    test_csv = write_csv(folder / "test.csv", toy_examples(80, seed=2) + unsure_pairs(6))  # 6 mistakes at least
    cfg = resolve(model=tiny_model, dataset=str(train_csv), test_file=str(test_csv), max_len=32, batch_size=16,
                  eval_batch_size=32, epochs=3, lr=3e-3, warmup_ratio=0.1, precision="fp32",
                  output_dir=str(folder / "out"))
    return cfg, train(cfg), folder / "out"


def split_of(cfg, split, folder):
    """(texts, labels, logits) of a split, the labels and logits as the best model gives them, in the split's order."""
    data, _ = load_data(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder / "best")
    loader = make_loaders(tokenize(data, tokenizer, cfg.max_len), tokenizer, cfg, "cpu")[split]
    model = AutoModelForSequenceClassification.from_pretrained(folder / "best")
    logits, labels = split_logits(model, loader, Accelerator(cpu=True))
    return data[split]["text"], labels, logits


def test_errors_are_exactly_the_misclassified_test_examples_most_confident_first(run):
    from predict import predict
    cfg, metrics, out = run
    test = metrics["test"]
    errors = read_jsonl(out / "errors.jsonl")
    wrong = test["n"] - sum(test["confusion_matrix"][i][i] for i in range(2))
    assert 0 < len(errors) == wrong
    data, _ = load_data(cfg)
    texts, labels = data["test"]["text"], [["neg", "pos"][i] for i in data["test"]["label"]]
    predicted = predict(texts, out / "best")
    expected = collections.Counter((t, lab) for t, lab, p in zip(texts, labels, predicted) if p["label"] != lab)
    assert collections.Counter((e["text"], e["label"]) for e in errors) == expected
    again = {p["text"]: p for p in predicted}
    for e in errors:
        assert e["predicted"] != e["label"] and e["predicted"] == again[e["text"]]["label"]
        assert e["score"] == pytest.approx(again[e["text"]]["score"], abs=1e-5)
        assert e["probs"] == pytest.approx(again[e["text"]]["probs"], abs=1e-5)
        assert e["p_label"] == pytest.approx(e["probs"][e["label"]])
    assert [e["score"] for e in errors] == sorted((e["score"] for e in errors), reverse=True)


def test_temperature_lowers_the_validation_loss_and_changes_no_prediction(run):
    cfg, metrics, out = run
    temperature = json.loads((out / "best" / "config.json").read_text())["calibration_temperature"]
    texts, labels, logits = split_of(cfg, "validation", out)
    assert len(set(texts) & set(dict(MISLABELED))) == 2  # the mistakes that make T a finite minimum
    # 42 validation texts with 2 mistakes: what analysis.calibrate decides (a held-out check), stored as decided
    kept, skipped = calibrate(logits, labels)
    assert temperature == metrics["test"]["temperature"] == pytest.approx(kept)
    assert metrics["test"]["calibration_skipped"] == skipped and (skipped is None) == (temperature != 1)
    assert nll(logits, labels, fit_temperature(logits, labels)) < nll(logits, labels, 1.0)
    assert torch.equal((logits / temperature).argmax(-1), logits.argmax(-1))
    # overconfident logits (x5) with 20% of the labels wrong: the fit cools them (T > 1), the loss falls
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (500,), generator=generator)
    noisy = torch.where(torch.rand(500, generator=generator) < 0.2, (labels + 1) % 3, labels)
    logits = 5 * (torch.nn.functional.one_hot(noisy, 3) + 0.3 * torch.randn(500, 3, generator=generator))
    fitted = fit_temperature(logits, labels)
    assert fitted > 1 and nll(logits, labels, fitted) < nll(logits, labels, 1.0)
    for t in (fitted * 0.9, fitted * 1.1):  # the minimum, not just lower
        assert nll(logits, labels, fitted) < nll(logits, labels, t)


def test_ece_as_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.03, 0.97], [0.25, 0.75], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 1])  # right, wrong, right, wrong
    # bins of 1/15: 0.95 and 0.97 share (14/15, 1] (accuracy 1/2, confidence 0.96); 0.75 and 0.55 are alone
    by_hand = 2 / 4 * abs(0.5 - 0.96) + 1 / 4 * abs(1 - 0.75) + 1 / 4 * abs(0 - 0.55)
    assert ece(probs, labels) == pytest.approx(by_hand) == pytest.approx(0.43)
    assert ece(torch.tensor([[0.2, 0.8]] * 5, dtype=torch.double), torch.tensor([1, 1, 1, 1, 0])) == pytest.approx(0)


def check_coverage_table(test):
    """Accuracy at 100% coverage is the test accuracy; fewer texts, higher thresholds as coverage shrinks."""
    table = test["coverage"]
    assert [c["coverage"] for c in table] == [1.0, 0.95, 0.9, 0.8, 0.5]
    assert table[0]["accuracy"] == pytest.approx(test["accuracy"]) and table[0]["n"] == test["n"]
    assert [c["n"] for c in table] == [math.ceil(c["coverage"] * test["n"]) for c in table]
    assert [c["threshold"] for c in table] == sorted(c["threshold"] for c in table)
    return [c["accuracy"] for c in table]


def test_accuracy_at_coverage(run):
    from predict import predict
    cfg, metrics, out = run
    assert check_coverage_table(metrics["test"])[0] < 1
    # the same numbers from predict.py's scores: the thresholds mean what --min-confidence compares them with
    data = load_data(cfg)[0]["test"]
    rows = predict(data["text"], out / "best")
    right = [r["label"] == ["neg", "pos"][label] for r, label in zip(rows, data["label"])]
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["score"])
    for c in metrics["test"]["coverage"]:
        kept = order[:c["n"]]
        assert rows[kept[-1]]["score"] - 1.01e-4 <= c["threshold"] <= rows[kept[-1]]["score"] - 1e-6  # rounded down
        assert c["accuracy"] == pytest.approx(sum(right[i] for i in kept) / c["n"], abs=1.01 / c["n"])  # ties
    # a model whose mistakes are its least sure texts: the accuracy never falls as the coverage shrinks
    generator = torch.Generator().manual_seed(0)
    margins = 4 * torch.rand(1000, generator=generator)
    right = torch.rand(1000, generator=generator) < torch.sigmoid(2 * margins)
    labels = torch.randint(0, 2, (1000,), generator=generator)
    predicted = torch.where(right, labels, 1 - labels)
    logits = margins[:, None] * torch.nn.functional.one_hot(predicted, 2)
    table = accuracy_at_coverage(logits.softmax(-1), labels)
    assert [c["accuracy"] for c in table] == sorted(c["accuracy"] for c in table)
    assert table[0]["accuracy"] == pytest.approx(float(right.double().mean()))
    small = accuracy_at_coverage(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]]),
                                 torch.tensor([0, 1, 0, 0]), coverages=(1.0, 0.5, 0.25))  # right, right, wrong, right
    assert [(c["n"], c["accuracy"], c["threshold"]) for c in small] == \
        [(4, 0.75, 0.5999), (2, 1.0, 0.7999), (1, 1.0, 0.8999)]  # at least 1e-6 below, 4 decimals
    card = (out / "best" / "README.md").read_text()
    at_90 = metrics["test"]["coverage"][2]
    assert f"At 90% coverage: {at_90['accuracy']:.1%} accurate, threshold {at_90['threshold']:.4g}." in card
    assert "## Is it good enough?" in card and "not proven errors" in card
    with Image.open(out / "calibration.png") as image:
        assert image.format == "PNG" and image.size == (1100, 450)


def test_min_confidence_abstains_exactly_below_the_threshold(run):
    from predict import predict
    cfg, metrics, out = run
    texts = load_data(cfg)[0]["test"]["text"]
    plain = predict(texts, out / "best")
    threshold = metrics["test"]["coverage"][2]["threshold"]  # 90% coverage
    sure = predict(texts, out / "best", min_confidence=threshold)
    # at least the 90% of the texts that the row counts are kept, its lowest too (its score differs in the last bits)
    assert sum(r["label"] is None for r in sure) <= len(texts) - math.ceil(0.9 * len(texts))
    for p, s in zip(plain, sure):
        assert s["label"] == (None if p["score"] < threshold else p["label"])
        assert (s["text"], s["score"], s["probs"]) == (p["text"], p["score"], p["probs"])
    unsure, clear = min(plain, key=lambda r: r["score"]), predict(["a great and wonderful film"], out / "best")[0]
    run_cli = subprocess.run([sys.executable, "predict.py", str(out / "best"), "--min-confidence",
                              str((unsure["score"] + clear["score"]) / 2), unsure["text"], clear["text"]], cwd=ROOT,
                             capture_output=True, text=True)
    rows = [json.loads(line) for line in run_cli.stdout.splitlines()]
    assert run_cli.returncode == 0 and [r["label"] for r in rows] == [None, "pos"], (unsure, rows)
    assert set(rows[0]) == {"text", "label", "score", "probs"}


def test_a_bf16_run_reports_what_predict_gives(tiny_model, tmp_path):
    """A run in bf16 still scores its test split in fp32, as predict.py does: errors.jsonl's scores are predict.py's
    and each coverage threshold keeps its texts. From bf16 logits (8-bit mantissa: many texts tied at one
    probability) a 50% row's threshold kept 149 of 150 texts, 61% accurate instead of the 75% it said."""
    from predict import predict
    train_csv = write_csv(tmp_path / "train.csv", toy_examples(200, seed=1) + MISLABELED)
    test_csv = write_csv(tmp_path / "test.csv", toy_examples(60, seed=2) + unsure_pairs(6))
    cfg = resolve(model=tiny_model, dataset=str(train_csv), test_file=str(test_csv), max_len=32, epochs=2,
                  min_steps=0, lr=3e-3, precision="bf16", audit=False, output_dir=str(tmp_path / "out"))
    metrics = train(cfg)
    assert metrics["precision"] == "bf16"
    texts = load_data(cfg)[0]["test"]["text"]
    plain = {r["text"]: r for r in predict(texts, tmp_path / "out" / "best")}
    for error in read_jsonl(tmp_path / "out" / "errors.jsonl"):
        assert error["score"] == pytest.approx(plain[error["text"]]["score"], abs=1e-5)
    for row in metrics["test"]["coverage"]:
        kept = predict(texts, tmp_path / "out" / "best", min_confidence=row["threshold"])
        assert sum(r["label"] is not None for r in kept) >= row["n"]


def test_predict_divides_the_logits_by_the_stored_temperature(run, tmp_path):
    import shutil
    from predict import predict
    _, metrics, out = run
    temperature = 0.7  # stored by hand: whether this run's validation split supports one is test_temperature_...'s
    best = shutil.copytree(out / "best", tmp_path / "best")
    config = json.loads((best / "config.json").read_text())
    (best / "config.json").write_text(json.dumps({**config, "calibration_temperature": temperature}))
    texts = ["a great film", "the worst plot", "the movie was fun and dull", "it is the story of a cast"]
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    model = AutoModelForSequenceClassification.from_pretrained(out / "best")
    with torch.no_grad():
        raw = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.double()
    rows = predict(texts, best)
    for row, logits in zip(rows, raw):
        assert [row["probs"]["neg"], row["probs"]["pos"]] == pytest.approx((logits / temperature).softmax(-1).tolist(),
                                                                           abs=1e-6)
    assert [r["score"] for r in rows] != pytest.approx(raw.softmax(-1).max(-1).values.tolist(), abs=1e-3)


def test_the_audit_lists_only_labels_the_model_is_sure_are_another_class():
    """An unsure model (3 classes, every p between 0.30 and 0.41, as after too few steps; 2 classes at a coin's
    0.50-0.51) names no suspect, though p(given label) < 0.5 everywhere; a sure (p >= 0.6) prediction of another
    class is named, and a given label that is also the predicted one never is."""
    names, texts = ["a", "b", "c"], [f"text {i}" for i in range(5)]
    unsure = torch.tensor([[0.41, 0.30, 0.29], [0.30, 0.39, 0.31], [0.33, 0.33, 0.34], [0.35, 0.35, 0.30],
                           [0.40, 0.31, 0.29]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 2, 2, 0])
    assert suspects(unsure, labels, texts, names) == []
    coin = torch.tensor([[0.5036, 0.4964], [0.4964, 0.5036], [0.5030, 0.4970]], dtype=torch.float64)
    assert suspects(coin, torch.tensor([1, 0, 1]), texts[:3], ["neg", "pos"]) == []
    sure = torch.tensor([[0.90, 0.05, 0.05], [0.45, 0.40, 0.15], [0.05, 0.05, 0.90], [0.05, 0.80, 0.15],
                         [0.60, 0.30, 0.10]], dtype=torch.float64)
    found = suspects(sure, labels, texts, names)
    assert [(s["text"], s["label"], s["predicted"]) for s in found] == [("text 0", "b", "a"), ("text 3", "c", "b")]


def test_mislabeled_training_examples_are_among_the_top_suspects(run):
    cfg, metrics, out = run
    suspects = read_jsonl(out / "suspect_labels.jsonl")
    train_texts = load_data(cfg)[0]["train"]["text"]
    assert metrics["audit"] == {"n": len(train_texts), "suspects": len(suspects)}
    assert metrics["timing"]["audit_seconds"] >= 0
    in_train = set(train_texts) & {text for text, _ in MISLABELED}
    assert len(in_train) == 12  # the other 2 went to the validation split
    top = {s["text"]: s for s in suspects[:len(in_train) + 2]}
    assert in_train <= set(top)
    given = dict(MISLABELED)
    for text in in_train:
        assert top[text]["label"] == given[text] != top[text]["predicted"] and top[text]["p_label"] < 0.5
    assert [s["p_label"] for s in suspects] == sorted(s["p_label"] for s in suspects)
    assert all(s["p_label"] == pytest.approx(s["probs"][s["label"]]) for s in suspects)


def test_no_audit_and_no_validation(tiny_model, toy_csv, tmp_path, fast):
    """--no-audit: no suspect_labels.jsonl; --val-fraction 0: no temperature (T = 1), and the card says so. On the
    toy task as it is (well separated), accuracy does not fall as the coverage shrinks."""
    metrics = train(resolve(dataset=toy_csv, output_dir=str(tmp_path / "out"), audit=False, val_fraction=0, **fast))
    accuracies = check_coverage_table(metrics["test"])
    assert accuracies == sorted(accuracies) and accuracies[0] >= 0.9
    out = tmp_path / "out"
    assert not (out / "suspect_labels.jsonl").exists() and (out / "errors.jsonl").exists()
    assert metrics["audit"] is None and metrics["timing"]["audit_seconds"] is None
    test = metrics["test"]
    assert test["temperature"] == 1.0 and test["calibrated_on"] is None and test["ece_calibrated"] == test["ece"]
    assert json.loads((out / "best" / "config.json").read_text())["calibration_temperature"] == 1.0
    assert "No temperature scaling (T = 1): no validation split" in (out / "best" / "README.md").read_text()
    # a validation split without a mistake does not determine T (the loss falls as T -> 0): none is fitted
    assert fit_temperature(torch.tensor([[2.0, -1.0], [0.5, 1.0]]), torch.tensor([0, 1])) is None
