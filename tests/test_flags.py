"""--truncation head|tail|head+tail, --class-weights none|balanced, --patience N: each does what it says, in
training and (truncation) in predict.py, and early stopping survives a crash and --resume."""
import json
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from sklearn.utils.class_weight import compute_class_weight
from tqdm import tqdm
from transformers import AutoTokenizer, get_scheduler

from toy import FILLER, NEGATIVE, POSITIVE, toy_examples, write_csv
from config import UserError, parse_args, resolve
from data import class_weights, describe, load_data, truncate
from predict import load_classifier, predict
from train import Run, load_model, train, train_epoch


# ---------------------------------------------------------------------------------------------------------------
# --truncation

def test_kept_ids_are_the_first_quarter_and_the_last_three_quarters(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids = list(range(100, 150))  # 50 ids; max_len 22 leaves room for 20 between [CLS] and [SEP]
    assert truncate([ids], tokenizer, 22, "head+tail") == [[cls, *ids[:5], *ids[-15:], sep]]
    assert truncate([ids], tokenizer, 22, "head") == [[cls, *ids[:20], sep]]
    assert truncate([ids], tokenizer, 22, "tail") == [[cls, *ids[-20:], sep]]
    assert truncate([ids[:20], []], tokenizer, 22, "head+tail") == [[cls, *ids[:20], sep], [cls, sep]]  # fit: kept


def test_head_is_what_the_tokenizer_itself_keeps(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [text for text, _ in toy_examples(20)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert truncate(ids, tokenizer, 12) == tokenizer(texts, truncation=True, max_length=12)["input_ids"]


def cue_at_the_end(n, seed=0):
    """Long texts (40 to 60 filler words, more than max_len 32 tokens) whose one sentiment word is the last word."""
    rng = random.Random(seed)
    rows = [(" ".join(rng.choices(FILLER, k=rng.randint(40, 60)) + [rng.choice(POSITIVE if i % 2 else NEGATIVE)]),
             ("neg", "pos")[i % 2]) for i in range(n)]
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory):
    return str(write_csv(tmp_path_factory.mktemp("long") / "long.csv", cue_at_the_end(400)))


def test_a_cue_at_the_end_is_learned_with_head_tail_and_not_with_head(tmp_path, fast, long_texts, capsys):
    fast = {**fast, "epochs": 6}  # one word among 50 to find: 6 epochs learn it from any tiny model's start (1.0)
    head = train(resolve(dataset=long_texts, output_dir=str(tmp_path / "head"), **fast))
    assert "Or keep the start and the end of each text, at the same cost: --truncation head+tail" in \
        capsys.readouterr().out  # every text is cut: the start-up line suggests it
    assert head["test"]["accuracy"] <= 0.65  # chance is 0.5: the cue was cut off
    both = train(resolve(dataset=long_texts, output_dir=str(tmp_path / "both"), truncation="head+tail", **fast))
    assert both["test"]["accuracy"] >= 0.9 and both["config"]["truncation"] == "head+tail"
    assert "--truncation head+tail" not in capsys.readouterr().out
    best = tmp_path / "both" / "best"
    assert json.loads((best / "config.json").read_text())["truncation"] == "head+tail"
    # predict.py cuts alike, from the saved config: at training's max_len the cue is kept
    texts, labels = zip(*cue_at_the_end(100, seed=1))
    assert np.mean([r["label"] == label for r, label in zip(predict(list(texts), best, max_len=32), labels)]) >= 0.9
    model, _ = load_classifier(str(best))
    model.config.truncation = "head"  # the same model, texts cut at the head: the cue is gone
    assert np.mean([r["label"] == label for r, label in zip(predict(list(texts), best, max_len=32), labels)]) <= 0.7
    model.config.truncation = "head+tail"  # load_classifier's cache is shared with later tests


# ---------------------------------------------------------------------------------------------------------------
# --class-weights

def test_balanced_class_weights_are_scikit_learns_and_weight_the_loss(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = toy_examples(40)
    rows = [r for r in rows if r[1] == "neg"][:9] + [r for r in rows if r[1] == "pos"][:3]
    labels = torch.tensor([int(label == "pos") for _, label in rows])
    expected = torch.tensor(compute_class_weight("balanced", classes=np.arange(2), y=labels.numpy()),
                            dtype=torch.float32)
    weights = class_weights(labels.tolist(), 2, "balanced")
    assert torch.allclose(weights, expected) and class_weights(labels.tolist(), 2, "none") is None
    batch = {**tokenizer([t for t, _ in rows], padding=True, return_tensors="pt"), "labels": labels}
    model = load_model(resolve(model=tiny_model), ["neg", "pos"])
    with torch.no_grad():  # a head that leans to neg: its losses on the rare pos texts are high, and weight shows
        model.classifier.bias.copy_(torch.tensor([1.0, -1.0]))  # (a fresh head's near-equal logits hide it)
    losses = {}
    for name, w in (("weighted", weights), ("plain", None)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights never move: one loss, twice
        state = {"batches_done": 0, "loss_sum": 0.0, "step": 0, "tokens": [0, 0]}
        AcceleratorState._reset_state()  # fp32 here, whatever precision an earlier test's accelerator left
        train_epoch(Run(cfg=resolve(model=tiny_model), accelerator=Accelerator(cpu=True, mixed_precision="no"),
                        state=state, model=model, optimizer=optimizer,
                        scheduler=get_scheduler("constant", optimizer), weights=w), [batch], tqdm(disable=True))
        losses[name] = state["loss_sum"]
    with torch.no_grad():
        logits = model(**batch).logits
    by_hand = torch.nn.functional.cross_entropy(logits, labels, weight=expected)
    assert losses["weighted"] == pytest.approx(float(by_hand), rel=1e-5)
    assert losses["plain"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert abs(losses["weighted"] - losses["plain"]) > 1e-3


def skewed(n=400):
    """9 neg for every pos."""
    rows = toy_examples(2 * n)
    return [r for r in rows if r[1] == "neg"][:n * 9 // 10] + [r for r in rows if r[1] == "pos"][:n // 10]


def test_skewed_classes_are_shown_with_what_helps(tmp_path, fast, capsys):
    data = str(write_csv(tmp_path / "skewed.csv", skewed()))
    splits, names = load_data(resolve(dataset=data))
    assert describe(splits, names, resolve()).splitlines()[1] == \
        "Skewed classes (training examples: neg 259 · pos 29): consider --metric-for-best f1_macro and " \
        "--class-weights balanced"
    balanced = toy_examples(40)
    assert "Skewed" not in describe(*load_data(resolve(dataset=str(write_csv(tmp_path / "b.csv", balanced)))),
                                    resolve())
    metrics = train(resolve(dataset=data, output_dir=str(tmp_path / "out"), class_weights="balanced",
                            metric_for_best="f1_macro", **{**fast, "epochs": 1}))
    out = capsys.readouterr().out
    assert "Skewed classes (training examples: neg 259 · pos 29)\n" in out  # nothing left to suggest
    assert metrics["config"]["class_weights"] == "balanced"


# ---------------------------------------------------------------------------------------------------------------
# --patience

@pytest.fixture
def stuck(fast, toy_csv, tmp_path):
    """A run whose validation accuracy cannot improve after epoch 1: an lr too small to move any weight."""
    return dict(fast, dataset=toy_csv, lr=1e-12, epochs=5, patience=2, checkpoint_every=0)


def epoch_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_patience_stops_after_n_validations_without_improvement(stuck, tmp_path, capsys):
    metrics = train(resolve(output_dir=str(tmp_path / "out"), **stuck))
    reason = "no improvement in val accuracy for 2 epochs"
    assert metrics["stopped_early"] == {"epoch": 3, "reason": reason} and metrics["best_epoch"] == 1
    rows = epoch_rows(tmp_path / "out")
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[-1]["stopped"] == reason and "stopped" not in rows[1]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["stopped_early"]["epoch"] == 3
    assert f"Stopped early: {reason}" in capsys.readouterr().out
    assert train(resolve(output_dir=str(tmp_path / "off"), **{**stuck, "patience": 0}))["stopped_early"] is None
    assert [r["epoch"] for r in epoch_rows(tmp_path / "off")] == [1, 2, 3, 4, 5]


def test_patience_survives_a_crash_and_resume(stuck, tmp_path, crash_at_checkpoint):
    stuck = {**stuck, "patience": 3}  # stops after epoch 4: epoch 3's checkpoint is not the last (no weights in that)
    expected = train(resolve(output_dir=str(tmp_path / "reference"), **stuck))
    # the machine dies at epoch 3's checkpoint: epoch 2's is kept, with one validation without gain counted
    crash_at_checkpoint(3, lambda: train(resolve(output_dir=str(tmp_path / "out"), **stuck)))
    saved = json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())
    assert (saved["epoch"], saved["bad_epochs"], saved["stopped"]) == (3, 1, None)
    resumed = train(resolve(output_dir=str(tmp_path / "out"), resume=True, **stuck))
    for key in ("stopped_early", "best_epoch", "val", "test"):
        assert resumed[key] == expected[key]
    assert [r["epoch"] for r in epoch_rows(tmp_path / "out")] == [1, 2, 3, 4]
    # a stopped run resumed with more epochs trains no more; another --patience is another run
    again = train(resolve(output_dir=str(tmp_path / "out"), resume=True, **{**stuck, "epochs": 8}))
    assert again["stopped_early"] == expected["stopped_early"] and len(epoch_rows(tmp_path / "out")) == 4
    with pytest.raises(UserError, match=r"cannot resume .* \(--patience 3 -> 4\)"):
        train(resolve(output_dir=str(tmp_path / "out"), resume=True, **{**stuck, "patience": 4}))


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line each

@pytest.mark.parametrize("argv, message", [
    (["--truncation", "middle"], "argument --truncation: invalid choice: 'middle'"),
    (["--class-weights", "inverse"], "argument --class-weights: invalid choice: 'inverse'"),
    (["--patience", "-1"], "--patience must be >= 0 (0 = off), not -1"),
    (["--patience", "2", "--val-fraction", "0"], "--patience needs a validation split to watch"),
])
def test_bad_values_are_refused_in_one_line(argv, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        parse_args(argv)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="must be one of head, tail, head\\+tail, not 'middle'"):
        resolve(truncation="middle")
