"""Using a trained model: predict.py (CLI and function) and export.py (ONNX, int8), each checked against PyTorch."""
import csv
import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from config import UserError, resolve
from train import train


@pytest.fixture(scope="module")
def trained(tiny_model, toy_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, epochs=3, lr=3e-3, precision="fp32",
                  output_dir=str(out)))
    return out / "best"


def cli(*args, stdin=""):
    return subprocess.run([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True)


def test_predict_function(trained):
    from predict import predict
    long_text = " ".join(["great film"] * 200)  # 400 words: beyond the model's 64 positions, truncated
    texts = ["a wonderful and brilliant film", "", "the worst and most boring plot", long_text]
    results = predict(texts, trained, batch_size=2)
    assert [r["text"] for r in results] == texts  # one result per input, in order
    assert [results[0]["label"], results[2]["label"], results[3]["label"]] == ["pos", "neg", "pos"]
    for r in results:
        assert set(r["probs"]) == {"neg", "pos"} and sum(r["probs"].values()) == pytest.approx(1, abs=1e-6)
        assert r["score"] == max(r["probs"].values()) and r["probs"][r["label"]] == r["score"]


def test_sorted_batches_give_the_same_predictions_as_one_by_one(trained):
    from predict import predict
    texts = ["good", "a really very boring and dull and awful plot of the film", "fun", "the cast was superb and it"]
    together = predict(texts, trained, batch_size=4)
    alone = [predict([t], trained, batch_size=1)[0] for t in texts]
    for a, b in zip(together, alone):
        assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_cli_from_stdin_file_and_csv(trained, tmp_path):
    run = cli(trained, "--top-k", "1", stdin="a great film\n\nan awful film\n")
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert run.returncode == 0 and [r["text"] for r in rows] == ["a great film", "", "an awful film"]
    assert all(len(r["probs"]) == 1 for r in rows) and rows[0]["label"] == "pos" and rows[2]["label"] == "neg"
    table = tmp_path / "in.csv"
    table.write_text("id,review\n1,a great film\n2,an awful film\n")
    run = cli(trained, "--file", table, "--format", "csv", "--output", tmp_path / "out.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out.csv").read_text())))
    assert run.returncode == 0 and [r["label"] for r in rows] == ["pos", "neg"]
    assert list(rows[0]) == ["text", "label", "score", "neg", "pos"]


def test_not_a_model_folder(tmp_path):
    run = cli(tmp_path, "some text")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path} is not a trained model folder (expected "
                                               "config.json, model.safetensors and the tokenizer files, as "
                                               "train.py writes in OUTPUT_DIR/best)"]
    from predict import load_classifier
    with pytest.raises(UserError):
        load_classifier(str(tmp_path))


def test_onnx_export_matches_pytorch_and_int8_predicts(trained):
    from export import main
    main([str(trained)])  # checks on the run's own test split, found through its metrics.json
    report = json.loads((trained / "onnx" / "report.json").read_text())
    assert report["n"] == 80
    assert report["onnx"]["max_abs_logit_diff"] <= 1e-4 and report["onnx"]["agreement"] == 1.0
    assert report["onnx"]["accuracy"] == report["pytorch"]["accuracy"]
    assert abs(report["onnx_int8"]["accuracy"] - report["pytorch"]["accuracy"]) <= 0.05
    from export import onnx_forward
    from predict import load_classifier, predict_logits
    _, tokenizer = load_classifier(str(trained))
    logits = predict_logits(["a great film", "an awful film"], tokenizer, onnx_forward(trained / "onnx" /
                                                                                      "model.int8.onnx"))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert logits.argmax(-1).tolist() == [1, 0]
