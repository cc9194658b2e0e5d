"""LoRA (--lora-r): it learns, it changes only the LoRA updates and the head, it resumes exactly after kill -9, best/
is a plain model predicting what the run reported, and two processes count every example once.

LoRA adapts a pretrained encoder; the tiny model's random one has nothing to adapt (measured: test accuracy 0.50 after
3 epochs at lr 1e-2 on q_lin/v_lin), so the encoder these tests adapt is first pretrained, by full fine-tuning on other
toy reviews, and saved without its head: the LoRA run starts from a new, random head, as on a real model."""
import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, pipeline

import train as train_module
from conftest import ROOT
from config import UserError, resolve
from data import load_data
from test_distributed import torchrun
from test_resume import assert_same_run, resume, start, wait_for_bar
from toy import toy_examples, toy_label_sets, unsure_pairs, write_csv
from train import default_lr, train


@pytest.fixture(scope="module")
def encoder(tiny_model_with_dropout, tmp_path_factory):
    """The tiny DistilBERT after full fine-tuning on 400 toy reviews of another seed, without its head."""
    folder = tmp_path_factory.mktemp("pretraining")
    data = write_csv(folder / "other.csv", toy_examples(400, seed=7))
    train(resolve(model=tiny_model_with_dropout, dataset=str(data), max_len=32, epochs=2, lr=3e-3, precision="fp32",
                  val_fraction=0, audit=False, output_dir=str(folder / "run")))
    AutoModel.from_pretrained(folder / "run" / "best").save_pretrained(folder / "encoder")  # the head left behind
    AutoTokenizer.from_pretrained(folder / "run" / "best").save_pretrained(folder / "encoder")
    return str(folder / "encoder")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training reviews, and a test file with 3 texts given both labels: 3 mistakes at least, whatever it learns."""
    folder = tmp_path_factory.mktemp("lora-data")
    return (str(write_csv(folder / "train.csv", toy_examples(300, seed=1))),
            str(write_csv(folder / "test.csv", toy_examples(40, seed=2) + unsure_pairs(3))))


def spy_on_the_model(monkeypatch):
    """The model train() builds, and a copy of its parameters as they were before training."""
    seen = {}
    load_model = train_module.load_model

    def load_and_keep(*args, **kwargs):
        seen["model"] = model = load_model(*args, **kwargs)
        seen["before"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return model
    monkeypatch.setattr(train_module, "load_model", load_and_keep)
    return seen


@pytest.fixture(scope="module")
def lora_run(encoder, data, tmp_path_factory):
    """A LoRA run, its metrics, its printout, and its model before and after training."""
    monkeypatch, capture = pytest.MonkeyPatch(), {}
    seen = spy_on_the_model(monkeypatch)
    out = tmp_path_factory.mktemp("lora") / "out"
    train_csv, test_csv = data
    settings = dict(model=encoder, dataset=train_csv, test_file=test_csv, max_len=32, epochs=3, lr=1e-2,
                    precision="fp32", lora_r=4, keep_checkpoint=True, output_dir=str(out))  # its weights: read below
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = train(resolve(**settings))
    monkeypatch.undo()
    capture.update(seen, metrics=metrics, out=out, printed=printed.getvalue(), settings=settings)
    return capture


def test_a_lora_run_learns_and_says_what_it_trains(lora_run):
    assert lora_run["metrics"]["val"]["accuracy"] >= 0.9
    assert lora_run["metrics"]["test"]["accuracy"] >= 0.85  # 6 of the 46 test texts cannot be right
    line = re.search(r"Model: \S+ \(([\d.]+)M of ([\d.]+)M parameters trained: LoRA r=4 on q_lin, v_lin, the head in "
                     r"full\)", lora_run["printed"])
    trained = sum(p.numel() for p in lora_run["model"].parameters() if p.requires_grad)
    shipped = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(lora_run["out"] / "best")
                  .parameters())
    assert line and float(line.group(1)) == float(f"{trained / 1e6:.3g}") and \
        float(line.group(2)) == float(f"{shipped / 1e6:.3g}") and trained < shipped / 5


def test_only_the_lora_updates_and_the_head_change(lora_run):
    model, before = lora_run["model"], lora_run["before"]
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or ".modules_to_save." in name for name in trained)
    assert {name.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for name in trained if "modules_to_save" in name} \
        == {"pre_classifier", "classifier"}  # DistilBERT's head is both, new: both train
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], before[name]) for name in frozen)  # bit-identical
    assert all(not torch.equal(after[name], before[name]) for name in trained)  # every trained one moved
    with safe_open(lora_run["out"] / "checkpoint" / "model.safetensors", "pt") as f:  # only what trains is kept
        assert set(f.keys()) == trained


def test_best_is_a_plain_model_that_predicts_what_the_run_reported(lora_run, encoder):
    best, metrics = lora_run["out"] / "best", lora_run["metrics"]
    assert "adapter_config.json" not in {p.name for p in best.iterdir()}  # a plain transformers model
    classify = pipeline("text-classification", model=str(best), device="cpu")
    cfg = resolve(**lora_run["settings"])
    test = load_data(cfg)[0]["test"]
    texts, names = list(test["text"]), metrics["test"]["labels"]
    predicted = [r["label"] for r in classify(texts, batch_size=16)]
    wrong = sorted((text, names[label], p) for text, label, p in zip(texts, test["label"], predicted)
                   if p != names[label])
    errors = [json.loads(line) for line in open(lora_run["out"] / "errors.jsonl")]
    assert wrong == sorted((e["text"], e["label"], e["predicted"]) for e in errors) and len(wrong) >= 3
    assert 1 - len(wrong) / len(predicted) == pytest.approx(metrics["test"]["accuracy"])
    # the adapter alone, on the base model, is the same classifier
    base = AutoModelForSequenceClassification.from_pretrained(encoder, config=AutoConfig.from_pretrained(best))
    adapted = PeftModel.from_pretrained(base, best / "adapter").eval()
    tokens = classify.tokenizer(texts[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(adapted(**tokens).logits, classify.model(**tokens).logits, atol=1e-5)
    card = (best / "README.md").read_text()
    assert "Fine-tuned with LoRA (r=4, alpha 8, dropout 0.1) on the layers q_lin, v_lin" in card


def test_sigkill_mid_epoch_then_resume_is_exact(encoder, tmp_path):
    data = write_csv(tmp_path / "toy.csv", toy_examples(600))
    flags = ["--model", encoder, "--dataset", str(data), "--max-len", "32", "--epochs", "2", "--lr", "1e-2",
             "--precision", "fp32", "--checkpoint-every", "3", "--lora-r", "4", "--no-audit"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "train.py", *flags, "--output-dir", str(reference)], cwd=ROOT, check=True,
                   capture_output=True)
    process = start(flags, tmp_path / "out")
    wait_for_bar(process, rb"epoch 2:\s+\d+%")  # 27 steps an epoch: a checkpoint every 3 steps is behind us
    process.kill()
    process.wait()
    step = int(re.search(r"Resuming .* at epoch 2, step (\d+)", resume(flags, tmp_path / "out")).group(1))
    assert 27 <= step < 54
    assert_same_run(tmp_path / "out", reference)


def test_two_processes_count_every_example_once(encoder, data, tmp_path):
    train_csv, test_csv = data
    out = tmp_path / "out"
    stdout = torchrun("train.py", f"--model={encoder}", f"--dataset={train_csv}", f"--test-file={test_csv}",
                      "--max-len=32", "--epochs=1", "--lr=1e-2", "--precision=fp32", "--eval-batch-size=4",
                      "--lora-r=4", "--no-audit", "--keep-checkpoint", f"--output-dir={out}")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and stdout.count("LoRA r=4") == 1
    assert metrics["test"]["n"] == 46 == sum(map(sum, metrics["test"]["confusion_matrix"]))
    with safe_open(out / "checkpoint" / "model.safetensors", "pt") as f:
        assert f.keys() and all("lora_" in k or ".modules_to_save." in k for k in f.keys())
    # the merged best/ of two processes, read by one plain pipeline, makes the recorded confusion matrix
    test = load_data(resolve(model=encoder, dataset=train_csv, test_file=test_csv))[0]["test"]
    names = metrics["test"]["labels"]
    predicted = [names.index(r["label"]) for r in pipeline("text-classification", model=str(out / "best"),
                                                           device="cpu")(list(test["text"]), batch_size=16)]
    confusion = [[sum(1 for y, p in zip(test["label"], predicted) if (y, p) == (i, j)) for j in range(len(names))]
                 for i in range(len(names))]
    assert confusion == metrics["test"]["confusion_matrix"]


def test_multi_label_with_class_weights_and_early_stopping(encoder, tmp_path):
    data = write_csv(tmp_path / "sets.csv", [(text, ";".join(labels)) for text, labels in toy_label_sets(240)])
    metrics = train(resolve(model=encoder, dataset=str(data), label_sep=";", max_len=32, epochs=2, lr=1e-2,
                            precision="fp32", lora_r=4, lora_targets="all-linear", class_weights="balanced",
                            patience=1, audit=False, output_dir=str(tmp_path / "out")))
    assert "f1_micro" in metrics["test"] and metrics["config"]["problem"] == "multi_label"
    adapted = json.loads((tmp_path / "out" / "best" / "adapter" / "adapter_config.json").read_text())
    assert {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"} == \
        {name.rsplit(".", 1)[-1] for name in adapted["target_modules"]} - {"pre_classifier"}


def test_the_default_lr_follows_lora_r_and_an_explicit_lr_wins():
    assert resolve().lr is None and resolve(lora_r=8).lr is None  # set by the model's width: train.default_lr
    assert default_lr(768) == 2e-5 and default_lr(768, lora_r=8) == pytest.approx(6e-4)
    assert default_lr(1024) == 2e-5 and default_lr(384) == 1e-4 and default_lr(384, lora_r=8) == pytest.approx(3e-3)
    assert resolve("demo", lora_r=8).lr == pytest.approx(3e-3)  # 30x the preset's
    assert resolve(lora_r=8, lr=3e-5).lr == 3e-5


@pytest.mark.parametrize("settings, message", [
    (dict(lora_r=-1), "--lora-r must be >= 0"),
    (dict(lora_r=8, lora_alpha=-2), "--lora-alpha must be >= 0"),
    (dict(lora_r=8, lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
    (dict(lora_r=8, lora_targets="q_lin,,v_lin"), "--lora-targets takes comma-separated layer names"),
    (dict(lora_alpha=16, lora_targets="all-linear"), "--lora-alpha, --lora-targets is for LoRA: add --lora-r R"),
])
def test_bad_lora_settings_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        resolve(**settings)


def test_targets_that_match_no_layer_are_one_line_and_exit_2(tiny_model, toy_csv, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--model", tiny_model, "--dataset", toy_csv, "--max-len", "32",
                          "--lora-r", "4", "--lora-targets", "q_lin,query", "--output-dir", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: --lora-targets query: no such layer in {tiny_model}; its linear layers are k_lin, lin1, lin2, "
        "out_lin, q_lin, v_lin (or pass all-linear)"]


def test_an_architecture_without_default_targets_asks_for_them(tiny_model, toy_csv, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "LORA_TARGETS", {})  # DistilBERT is not in peft's own table
    with pytest.raises(UserError, match=r"LoRA on .* \(distilbert\): .*target_modules.* \(name them with "
                                        r"--lora-targets, or pass all-linear\)"):
        train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, lora_r=4, output_dir=str(tmp_path / "out")))
