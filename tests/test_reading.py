"""What you are shown is what you get: a saved model reads texts exactly as its run did (best/ stores the --max-len),
export.py finds its run's data from any folder and says which files it wrote, and a temperature is stored only where
the validation split supports one."""
import json
import random

import pytest
import torch

from analysis import TEMPERATURE_RANGE, assess, calibrate, fit_temperature
from config import resolve
from data import encode
from test_predict import run_main
from toy import FILLER, NEGATIVE, POSITIVE, write_csv
from train import train

MAX_LEN = 16  # 14 tokens of text between [CLS] and [SEP]: every text below is longer


def long_examples(n, seed, noise):
    """Texts of 30 to 34 words: a sentiment word of the label's side near the start and one near the end (what the
    head and the tail see at --max-len 16), and between them four of either side at random, which only a model
    reading the whole text sees; a share `noise` of the labels flipped, so that a test split always has mistakes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        side = POSITIVE if label else NEGATIVE
        middle = [rng.choice(rng.choice((POSITIVE, NEGATIVE))) for _ in range(4)] + \
            rng.choices(FILLER, k=rng.randint(2, 6))
        rng.shuffle(middle)
        words = [rng.choice(FILLER), rng.choice(side)] + rng.choices(FILLER, k=12) + middle + \
            rng.choices(FILLER, k=8) + [rng.choice(side), rng.choice(FILLER)]
        flipped = rng.random() < noise
        rows.append((" ".join(words), ("neg", "pos")[label ^ flipped]))
    return rows


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-texts")
    write_csv(folder / "train.csv", long_examples(400, seed=1, noise=0.1))
    write_csv(folder / "test.csv", long_examples(60, seed=2, noise=0.2))
    return folder


def short_run(tiny_model, data_folder, out, truncation, monkeypatch):
    """Three short epochs at --max-len 16 on the long texts, the data named by paths relative to where it runs; a
    validation split of 4 texts (too few for a temperature)."""
    monkeypatch.chdir(data_folder)
    metrics = train(resolve(model=tiny_model, dataset="train.csv", test_file="test.csv", max_len=MAX_LEN,
                            truncation=truncation, epochs=3, lr=3e-3, batch_size=16, precision="fp32",
                            val_fraction=0.01, output_dir=str(out)))
    monkeypatch.undo()
    return metrics


@pytest.fixture(scope="module")
def tail_run(tiny_model, data_folder, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        out = tmp_path_factory.mktemp("tail") / "run"
        return short_run(tiny_model, data_folder, out, "tail", monkeypatch), out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_predict_reads_as_the_run_did(out, tmp_path):
    """predict.py's scores for the run's own test mistakes are errors.jsonl's (which the run computed from its test
    logits); best/ says how it reads texts, and its tokenizer cuts at the same length."""
    import predict
    errors = read_jsonl(out / "errors.jsonl")
    assert len(errors) >= 5  # label noise: the test split has mistakes whatever the model learned
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(e["text"] + "\n" for e in errors))
    code, stdout, _ = run_main(predict, out / "best", "--file", texts)
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == [e["text"] for e in errors]
    for row, error in zip(rows, errors):
        assert row["label"] == error["predicted"] and row["score"] == pytest.approx(error["score"], abs=1e-4)
        assert row["probs"] == pytest.approx(error["probs"], abs=1e-4)
    whole = predict.predict([e["text"] for e in errors], out / "best", max_len=64)  # the model's limit: not cut
    assert max(abs(w["score"] - e["score"]) for w, e in zip(whole, errors)) > 1e-3  # where it cuts matters
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["max_len"] == MAX_LEN
    tokenizer = predict.load_classifier(str(out / "best"))[1]
    assert tokenizer.model_max_length == MAX_LEN
    ids = encode(tokenizer, [e["text"] for e in errors], MAX_LEN, config["truncation"])["input_ids"]
    assert all(len(row) == MAX_LEN for row in ids)  # every text is longer than max_len: each one was cut
    if config["truncation"] != "head+tail":  # a plain pipeline(..., truncation=True) cuts the same way
        assert tokenizer([e["text"] for e in errors], truncation=True)["input_ids"] == ids
    return rows


def test_predict_reads_long_texts_as_training_did_tail(tail_run, tmp_path):
    check_predict_reads_as_the_run_did(tail_run[1], tmp_path)


@pytest.mark.parametrize("truncation", ["head", "head+tail"])
def test_predict_reads_long_texts_as_training_did(truncation, tiny_model, data_folder, tmp_path, monkeypatch):
    short_run(tiny_model, data_folder, tmp_path / "run", truncation, monkeypatch)
    check_predict_reads_as_the_run_did(tmp_path / "run", tmp_path)


def test_max_len_given_to_predict_still_overrides(tail_run):
    from predict import predict
    best, text = tail_run[1] / "best", " ".join(["great"] + ["the"] * 40 + ["awful"])
    assert predict([text], best)[0]["probs"] != predict([text], best, max_len=64)[0]["probs"]
    assert predict([text], best)[0]["probs"] == predict([text], best, max_len=MAX_LEN)[0]["probs"]


def test_export_from_another_folder_says_what_it_wrote(tail_run, data_folder, tmp_path, monkeypatch):
    """The run named its data by relative paths: metrics.json records them resolved, and export.py, started
    elsewhere, finds the test split. It checks at the run's max_len, writes one self-contained .onnx file per model
    (the tiny model is far below protobuf's 2 GB) and says where."""
    import export
    metrics, out = tail_run
    recorded = json.loads((out / "metrics.json").read_text())["config"]
    assert (recorded["dataset"], recorded["test_file"]) == (str((data_folder / "train.csv").resolve()),
                                                            str((data_folder / "test.csv").resolve()))
    assert metrics["config"] == recorded
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_main(export, out / "best", "--output-dir", "onnx-here")
    assert code == 0, stderr
    report = json.loads((tmp_path / "onnx-here" / "report.json").read_text())
    assert report["n"] == 60 and report["max_len"] == MAX_LEN and report["truncation"] == "tail"
    assert report["pytorch"]["accuracy"] == pytest.approx(metrics["test"]["accuracy"])  # read as the run read its test split
    assert report["onnx"]["max_abs_logit_diff"] <= 1e-4 and report["one_file"] is True
    assert sorted(p.name for p in (tmp_path / "onnx-here").iterdir()) == ["model.int8.onnx", "model.onnx",
                                                                         "report.json"]
    lines = stdout.splitlines()
    assert f"Wrote {tmp_path / 'onnx-here' / 'model.onnx'} (fp32, " in stdout and "weights inside" in stdout
    assert f"{tmp_path / 'onnx-here' / 'model.int8.onnx'} (int8, " in stdout
    assert any(f"at most {MAX_LEN} tokens (truncation tail)" in line for line in lines)
    # --file: texts from elsewhere, still read at the model's own max_len (it once fell back to the model's 64)
    (tmp_path / "texts.txt").write_text("a great film\nan awful film\n")
    code, _, stderr = run_main(export, out / "best", "--file", "texts.txt", "--output-dir", "onnx-file")
    assert code == 0, stderr
    assert json.loads((tmp_path / "onnx-file" / "report.json").read_text())["max_len"] == MAX_LEN


def test_export_names_a_relative_data_path_it_cannot_find(tail_run, tmp_path):
    """A run recorded before paths were resolved: one line saying where to run export.py from."""
    import shutil
    import export
    from test_predict import refused
    run = shutil.copytree(tail_run[1], tmp_path / "old-run", ignore=shutil.ignore_patterns("checkpoint"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"]["dataset"] = "train.csv"
    (run / "metrics.json").write_text(json.dumps(metrics))
    refused(run_main(export, run / "best", "--output-dir", tmp_path / "onnx"),
            f"{run / 'metrics.json'}: the run's --dataset train.csv is not found from ")
    assert not (tmp_path / "onnx").exists()


def test_export_refuses_a_test_file_changed_since_the_run(tail_run, data_folder, tmp_path):
    """The run's test file relabelled after it trained: export.py scored the model on the new labels (accuracy 0)
    and called it the run's test split. The data's fingerprint in checkpoint/state.json tells, as --resume's does."""
    import shutil
    import export
    from test_predict import refused
    run = shutil.copytree(tail_run[1], tmp_path / "run")
    for name in ("train.csv", "test.csv"):
        shutil.copy(data_folder / name, tmp_path / name)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["config"].update(dataset=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.csv"))
    (run / "metrics.json").write_text(json.dumps(metrics))
    code, _, stderr = run_main(export, run / "best", "--output-dir", tmp_path / "same", "--samples", "20")
    assert code == 0, stderr  # the same content elsewhere: the same data
    assert json.loads((tmp_path / "same" / "report.json").read_text())["n"] == 20
    other = shutil.copytree(run, tmp_path / "other-run")  # another model's export is not replaced under its name
    refused(run_main(export, other / "best", "--output-dir", tmp_path / "same"),
            f"--output-dir {tmp_path / 'same'} holds the export of another model ({(run / 'best').resolve()})")
    code, _, stderr = run_main(export, run / "best", "--output-dir", tmp_path / "same", "--samples", "10")
    assert code == 0, stderr  # its own: exported again
    test = (tmp_path / "test.csv").read_text()
    (tmp_path / "test.csv").write_text(test.replace(",pos\n", ",tmp\n").replace(",neg\n", ",pos\n")
                                       .replace(",tmp\n", ",neg\n"))
    refused(run_main(export, run / "best", "--output-dir", tmp_path / "onnx"),
            f"the run's data ({tmp_path / 'train.csv'}, --test-file {tmp_path / 'test.csv'}) changed since it trained")
    assert not (tmp_path / "onnx").exists()


# ---- temperature scaling: fitted only where the validation split supports it

def overconfident(n, seed=0, wrong=0.2, scale=5.0):
    """Logits of a 3-class model that is right 80% of the time and far surer than that: a temperature helps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    predicted = torch.where(torch.rand(n, generator=generator) < wrong, (labels + 1) % 3, labels)
    return scale * (torch.nn.functional.one_hot(predicted, 3) + 0.3 * torch.randn(n, 3, generator=generator)), labels


def test_a_temperature_is_kept_only_where_held_out_halves_confirm_it():
    logits, labels = overconfident(400)
    temperature, skipped = calibrate(logits, labels)
    assert skipped is None and temperature == fit_temperature(logits, labels) > 1
    # 2 validation texts, one wrong (a 50% model): a fit would be T ~ 0.02 and scores near 1; not supported
    two = torch.tensor([[2.0, -2.0], [1.5, -1.0]]), torch.tensor([0, 1])
    temperature, skipped = calibrate(*two)
    assert temperature == 1.0 and skipped.startswith("too few validation mistakes (1 in 2 texts)")
    # 24 texts of the overconfident model: too few to tell a real gain from chance (seeds where the fit is noise)
    small = [calibrate(*overconfident(24, seed)) for seed in range(20)]
    assert sum(skipped is not None for _, skipped in small) >= 15
    assert all(t == 1.0 for t, skipped in small if skipped is not None)


def test_a_temperature_at_the_end_of_the_range_is_no_fit():
    """A model whose mistakes are as sure as its right answers: the loss falls without end as T grows (uniform
    scores); the search ends at 100, which is no fit. Before, T = 100 was stored as if it were one."""
    labels = torch.arange(200) % 2
    logits = 4 * torch.nn.functional.one_hot(torch.arange(200) // 2 % 2, 2).double()  # right on half of them
    assert fit_temperature(logits, labels) is None
    temperature, skipped = calibrate(logits, labels)
    assert temperature == 1.0 and f"end of the range, {TEMPERATURE_RANGE[0]:g} or {TEMPERATURE_RANGE[1]:g}" in skipped
    texts = {"test": [f"text {i}" for i in range(200)], "train": []}
    quality = assess((logits, labels), (logits, labels), None, ["neg", "pos"], texts)
    assert quality["saved"] == {"calibration_temperature": 1.0} and quality["test"]["calibrated_on"] is None
    assert quality["test"]["calibration_skipped"] == skipped


def test_a_run_with_a_tiny_validation_split_keeps_t_1_and_says_why(tail_run):
    """A run's 4 validation texts cannot support a temperature: T = 1 is stored, and metrics.json, the output line
    and the card say why (here: no mistake among them; the unit tests above cover the rest)."""
    metrics, out = tail_run
    test = metrics["test"]
    assert metrics["val"]["n"] == 4 and test["temperature"] == 1.0 and test["calibrated_on"] is None
    assert test["calibration_skipped"] and test["ece_calibrated"] == test["ece"]
    assert json.loads((out / "best" / "config.json").read_text())["calibration_temperature"] == 1.0
    assert f"No temperature scaling (T = 1): {test['calibration_skipped']}." in (out / "best" / "README.md").read_text()
