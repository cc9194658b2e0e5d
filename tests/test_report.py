"""What people look at: length statistics, curves.png, confusion.png, the model card, tensorboard, step rows."""
import json
import subprocess
import sys

import pytest
import yaml
from PIL import Image
from transformers import AutoTokenizer

import config
from conftest import ROOT
from config import UserError, resolve
from report import describe_lengths, length_stats, model_card
from toy import toy_examples, write_csv
from train import train


@pytest.fixture(scope="module")
def run(tiny_model, toy_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    metrics = train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, epochs=3, lr=3e-3, precision="fp32",
                            log_every=4, length_histogram=True, report_to="tensorboard", output_dir=str(out)))
    return out, metrics


def test_pictures_are_real_images(run):
    out, _ = run
    for name in ("curves.png", "confusion.png", "lengths.png"):
        with Image.open(out / name) as image:
            image.verify()  # a whole, valid PNG
        with Image.open(out / name) as image:
            width, height = image.size
            assert image.format == "PNG" and 300 <= width <= 2000 and 200 <= height <= 2000, (name, image.size)


def test_model_card_header_and_numbers_match_metrics(run):
    out, metrics = run
    text = (out / "best" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["pipeline_tag"] == "text-classification" and header["library_name"] == "transformers"
    # a local model and data file: no local paths in the header (they mean nothing on the Hub), but in the text
    assert "base_model" not in header and "datasets" not in header and "dataset" not in str(header["model-index"])
    assert f"fine-tuned from `{metrics['config']['model']}`" in text and f"on `{metrics['config']['dataset']}`" in text
    hub_run = {**metrics, "config": {**metrics["config"], "model": "distilbert-base-uncased",
                                     "dataset": "stanfordnlp/imdb"}}
    hub_header = yaml.safe_load(model_card(hub_run, {"train": 1}).split("---")[1])
    assert hub_header["base_model"] == "distilbert-base-uncased" and hub_header["datasets"] == ["stanfordnlp/imdb"]
    values = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert values == {"accuracy": metrics["test"]["accuracy"], "f1": metrics["test"]["f1_macro"]}
    assert f"| accuracy | {metrics['test']['accuracy']:.4f} |" in text
    pos = metrics["test"]["per_class"]["pos"]
    assert f"| pos | {pos['precision']:.4f} | {pos['recall']:.4f} | {pos['f1']:.4f} | {pos['support']} |" in text
    assert 'pipeline("text-classification"' in text


def test_step_rows_in_the_log(run):
    out, _ = run
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(4, 55, 4))  # 18 steps an epoch, 3 epochs, every 4th
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3]
    assert all(0 < r["train_loss"] < 1 and r["lr"] >= 0 for r in steps)


def test_tensorboard_gets_the_same_numbers(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, metrics = run
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "val_accuracy", "lr", "test_accuracy"} <= set(tags)
    assert events.Scalars("test_accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val_accuracy"] for r in rows if r["kind"] == "epoch"]
    assert [e.value for e in events.Scalars("val_accuracy")] == pytest.approx(val)


def test_length_statistics_on_a_hand_made_example(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [" ".join(["good"] * k) for k in range(1, 11)]  # k words -> k + 2 tokens ([CLS], [SEP]): 3..12
    stats = length_stats(texts, tokenizer, max_len=8)
    assert stats["n"] == 10 and stats["median"] == 7.5 and stats["max"] == 12
    assert stats["p90"] == pytest.approx(11.1) and stats["truncated"] == pytest.approx(0.4)  # 9, 10, 11, 12 tokens
    assert "40% cut at --max-len 8" in describe_lengths(stats) and "More than a quarter" in describe_lengths(stats)
    assert "More than a quarter" not in describe_lengths(length_stats(texts, tokenizer, max_len=11))
    # At the longest length worth suggesting, or beyond it, no "longer" --max-len: it would be the one in use
    stats = dict(stats, p90=500.0, max_len=512)
    assert "--max-len 512 would keep" not in describe_lengths(stats)
    assert "cut: keep the start and the end" in describe_lengths(stats)
    assert "More than a quarter" not in describe_lengths(stats, truncation="head+tail")


def test_missing_tracker_package_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(config.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--report-to wandb needs its package: pip install wandb"):
        resolve(report_to="wandb")


def test_a_failing_picture_costs_nothing_else(tiny_model, toy_csv, tmp_path):
    """Without matplotlib (the crash of a user's first run, once): exit 0, the test metrics printed, the model,
    metrics.json and the model card written, and one line naming each picture that could not be drawn."""
    out = tmp_path / "run"
    flags = ["--model", tiny_model, "--dataset", toy_csv, "--max-len", "32", "--epochs", "1", "--precision", "fp32",
             "--output-dir", str(out)]
    no_matplotlib = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['train.py'] + sys.argv[1:]; "
                     "runpy.run_path('train.py', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", no_matplotlib, *flags], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Test accuracy" in run.stdout and f"Model saved to {out / 'best'}" in run.stdout
    failed = [line for line in run.stderr.splitlines() if line.startswith("Could not write")]
    assert [line.split(":")[0] for line in failed] == ["Could not write curves.png", "Could not write confusion.png",
                                                       "Could not write calibration.png"]
    assert (out / "metrics.json").is_file() and (out / "best" / "model.safetensors").is_file()
    assert (out / "best" / "README.md").is_file() and not (out / "curves.png").exists()


def test_a_thousand_classes_finish_with_a_readable_picture(tiny_model, tmp_path):
    """200 classes once took 6.9 GB for the picture's cell texts, and 500 were killed for memory."""
    words = toy_examples(10_000)
    rows = [(text, f"class-{i % 1000}") for i, (text, _) in enumerate(words)]
    data = write_csv(tmp_path / "many.csv", rows)
    metrics = train(resolve(model=tiny_model, dataset=str(data), max_len=16, batch_size=64, epochs=1, val_fraction=0.15,
                            precision="fp32", output_dir=str(tmp_path / "out")))
    assert len(metrics["test"]["confusion_matrix"]) == 1000 and metrics["test"]["n"] == 2000
    with Image.open(tmp_path / "out" / "confusion.png") as image:
        assert image.size == (1400, 700)  # the many-classes layout, whatever the count
