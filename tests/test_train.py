"""End to end on the tiny checkpoint: every data format, the output files, reloading, reproducibility."""
import json
import os

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, pipeline

from toy import toy_examples, write_csv
from config import resolve
from train import train


def run(tmp_path, dataset, **overrides):
    return train(resolve(dataset=str(dataset), output_dir=str(tmp_path / "out"), **overrides))


def write_folder(root, rows):
    for i, (text, label) in enumerate(rows):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return root


def write_format(tmp_path, fmt, rows):
    """The same examples as csv, tsv, jsonl, json, parquet or a folder of class sub-folders."""
    frame = pd.DataFrame(rows, columns=["review", "sentiment"])  # not named text/label: auto-detection at work
    path = tmp_path / f"data.{fmt}"
    if fmt == "folder":
        return write_folder(tmp_path / "data", rows)
    if fmt in ("csv", "tsv"):
        frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif fmt == "json":
        frame.to_json(path, orient="records")
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "json", "parquet", "folder"])
def test_every_format_learns_the_toy_task(tmp_path, fast, fmt):
    metrics = run(tmp_path, write_format(tmp_path, fmt, toy_examples(400)), **fast)
    assert metrics["test"]["labels"] == ["neg", "pos"]
    assert metrics["test"]["accuracy"] >= 0.9  # chance is 0.5


def test_outputs_follow_the_contract(tmp_path, fast, toy_csv):
    metrics = run(tmp_path, toy_csv, **fast)
    out = tmp_path / "out"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["test"] == metrics["test"] and on_disk["best_epoch"] == metrics["best_epoch"]
    test = on_disk["test"]
    assert set(test) >= {"accuracy", "f1_macro", "per_class", "confusion_matrix", "labels", "n"}
    assert set(test["per_class"]["pos"]) == {"precision", "recall", "f1", "support"}
    assert sum(map(sum, test["confusion_matrix"])) == test["n"] == 80  # 20% of 400, each example once
    assert on_disk["val"]["n"] == 32 and on_disk["config"]["lr"] == fast["lr"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert set(log[0]) >= {"epoch", "step", "train_loss", "lr", "val_accuracy", "val_f1_macro", "seconds"}
    assert log[-1]["train_loss"] < log[0]["train_loss"]  # the loss falls
    assert log[-1]["step"] == 3 * 18  # 288 training examples / 16 per batch = 18 steps an epoch
    umask = os.umask(0)
    os.umask(umask)
    modes = {file.name: file.stat().st_mode & 0o777 for file in (out / "best").iterdir() if file.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # the weights too (save_pretrained wrote them 0600)


def test_best_model_works_in_a_pipeline(tmp_path, fast, toy_csv):
    run(tmp_path, toy_csv, **fast)
    classify = pipeline("text-classification", model=str(tmp_path / "out" / "best"), device="cpu")
    good, bad = classify(["a great and wonderful film", "the worst and most boring plot"])
    assert (good["label"], bad["label"]) == ("pos", "neg")


def test_integer_labels_keep_their_values_as_names(tmp_path, fast):
    rows = [(text, {"neg": 10, "pos": 2}[label]) for text, label in toy_examples(400)]  # not 0..K-1, 10 > 2
    metrics = run(tmp_path, write_csv(tmp_path / "ints.csv", rows), **fast)
    assert metrics["test"]["labels"] == ["2", "10"]  # sorted as numbers, not as strings
    assert metrics["test"]["accuracy"] >= 0.9


def test_separate_test_file_and_no_validation(tmp_path, fast):
    train_csv = write_csv(tmp_path / "train.csv", toy_examples(300, seed=1))
    test_csv = write_csv(tmp_path / "test.csv", toy_examples(51, seed=2))
    metrics = run(tmp_path, train_csv, test_file=str(test_csv), val_fraction=0, **fast)
    assert metrics["val"] is None and metrics["best_epoch"] == 3  # no validation: the last epoch is kept
    assert metrics["test"]["n"] == 51
    assert metrics["test"]["accuracy"] >= 0.9


def test_subsamples_are_stratified_and_capped(tmp_path, fast, toy_csv):
    rows = toy_examples(400)
    rows = sorted(rows, key=lambda r: r[1])  # sorted by label, like IMDB: the first N rows would be one class
    metrics = run(tmp_path, write_csv(tmp_path / "sorted.csv", rows), train_samples=100, eval_samples=30, **fast)
    test = metrics["test"]
    assert test["n"] == 30 and metrics["val"]["n"] == 30
    assert {c["support"] for c in test["per_class"].values()} == {15}


def test_same_seed_same_metrics(tmp_path, fast, toy_csv):
    first = run(tmp_path / "a", toy_csv, **{**fast, "epochs": 1})
    second = run(tmp_path / "b", toy_csv, **{**fast, "epochs": 1})
    assert first["test"] == second["test"] and first["val"] == second["val"]
    third = run(tmp_path / "c", toy_csv, **{**fast, "epochs": 1, "seed": 7})
    assert third["val"]["loss"] != first["val"]["loss"]


def test_a_model_stored_in_fp16_trains_in_fp32(tmp_path, fast, toy_csv, tiny_model):
    """Checkpoints are often shared in fp16: loaded as stored, the training loss became nan at step 2. The weights
    are loaded in fp32 (autocast, not the stored dtype, decides the matmuls' precision), and best/ is fp32."""
    from transformers import AutoModel
    half = tmp_path / "fp16"
    AutoModel.from_pretrained(tiny_model).half().save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(half)
    metrics = run(tmp_path, toy_csv, **{**fast, "model": str(half)})
    assert metrics["test"]["accuracy"] >= 0.75  # chance is 0.5
    assert json.loads((tmp_path / "out" / "best" / "config.json").read_text())["dtype"] == "float32"


def test_reloaded_model_predicts_the_same(tmp_path, fast, toy_csv):
    """best/ holds the model that was tested: reloading and evaluating gives the recorded test metrics."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from data import load_data
    from train import classification_metrics
    cfg = resolve(dataset=toy_csv, output_dir=str(tmp_path / "out"), **fast)
    metrics = train(cfg)
    best = tmp_path / "out" / "best"
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(best), AutoTokenizer.from_pretrained(best)
    test = load_data(cfg)[0]["test"]
    with torch.no_grad():
        logits = model(**tokenizer(list(test["text"]), truncation=True, max_length=32, padding=True,
                                   return_tensors="pt")).logits
    again = classification_metrics(list(test["label"]), logits.argmax(-1).numpy(), ["neg", "pos"])
    assert again["confusion_matrix"] == metrics["test"]["confusion_matrix"]


def test_a_second_run_in_the_same_process_may_change_precision(tmp_path, fast, toy_csv):
    """As in a notebook: train in fp32, then again in bf16 (accelerate keeps its state per process)."""
    run(tmp_path / "a", toy_csv, **{**fast, "epochs": 1})
    metrics = run(tmp_path / "b", toy_csv, **{**fast, "epochs": 1, "precision": "bf16"})
    assert metrics["precision"] == "bf16" and metrics["test"]["n"] == 80
