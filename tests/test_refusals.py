"""Mistakes a user can make end in one clear line (UserError -> exit 2), early, and harm no earlier output."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from toy import toy_examples, write_csv
from config import UserError, resolve
from train import train


def refused(tmp_path, message, **overrides):
    """Refused with `message` in one line, even with --overwrite: the earlier run in output_dir is untouched."""
    earlier = tmp_path / "out"
    earlier.mkdir(parents=True, exist_ok=True)
    (earlier / "metrics.json").write_text('{"earlier": "run"}')
    with pytest.raises(UserError, match=message) as caught:
        train(resolve(**{"output_dir": str(earlier), "overwrite": True, **overrides}))
    assert "\n" not in str(caught.value)
    assert (earlier / "metrics.json").read_text() == '{"earlier": "run"}'
    return str(caught.value)


@pytest.fixture
def tiny(tiny_model):
    return dict(model=tiny_model, max_len=32, epochs=1, precision="fp32")


def test_missing_file(tmp_path, tiny):
    refused(tmp_path, "no such file or folder", dataset=str(tmp_path / "nope.csv"), **tiny)


def test_a_missing_file_is_told_before_the_model_is_looked_for(tmp_path):
    refused(tmp_path, "nope.csv: no such file or folder", dataset=str(tmp_path / "nope.csv"),
            test_file=str(tmp_path / "test.csv"), model=str(tmp_path / "no-such-model"))
    refused(tmp_path, "news: no such file or folder", dataset=str(tmp_path / "news"),  # a folder: no suffix
            model=str(tmp_path / "no-such-model"))
    (tmp_path / "train.csv").write_text("text,label\na,b\n")
    refused(tmp_path, "test.csv: no such file or folder", dataset=str(tmp_path / "train.csv"),
            test_file=str(tmp_path / "test.csv"), model=str(tmp_path / "no-such-model"))


def test_unsupported_file_type(tmp_path, tiny):
    (tmp_path / "data.xlsx").write_text("x")
    refused(tmp_path, "unsupported file type", dataset=str(tmp_path / "data.xlsx"), **tiny)


def test_missing_text_column_lists_the_columns(tmp_path, tiny):
    path = write_csv(tmp_path / "d.csv", toy_examples(20), header=("words", "label"))
    message = refused(tmp_path, "no text column found", dataset=str(path), **tiny)
    assert "the columns are: words, label" in message and "--text-column" in message
    refused(tmp_path, "text column 'body' not found; the columns are: words, label", dataset=str(path),
            text_column="body", **tiny)


def test_float_labels(tmp_path, tiny):
    path = write_csv(tmp_path / "d.csv", [(t, 0.5 if lab == "pos" else 1.5) for t, lab in toy_examples(20)])
    refused(tmp_path, "decimal numbers", dataset=str(path), **tiny)


def test_missing_labels(tmp_path, tiny):
    rows = toy_examples(20)
    rows[3] = (rows[3][0], "")
    refused(tmp_path, "1 training example", dataset=str(write_csv(tmp_path / "d.csv", rows)), **tiny)


def test_single_class(tmp_path, tiny):
    path = write_csv(tmp_path / "d.csv", [(t, "pos") for t, _ in toy_examples(20)])
    refused(tmp_path, "single class", dataset=str(path), **tiny)


def test_not_utf8_names_file_and_line(tmp_path, tiny):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ngood film,pos\ncaf\xe9 bad,neg\n".encode("latin-1"))
    refused(tmp_path, r"d.csv, line 3: not valid utf-8; pass --encoding", dataset=str(path), **tiny)


def test_encoding_flag_reads_latin1(tmp_path, tiny):
    rows = [(t + (" café" if i % 7 == 0 else ""), lab) for i, (t, lab) in enumerate(toy_examples(200))]
    path = tmp_path / "latin.csv"
    path.write_bytes(("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)).encode("latin-1"))
    metrics = train(resolve(dataset=str(path), encoding="latin-1", output_dir=str(tmp_path / "out"), **tiny))
    assert metrics["test"]["n"] == 40


def test_unseen_test_labels(tmp_path, tiny):
    train_csv = write_csv(tmp_path / "train.csv", toy_examples(40))
    test_csv = write_csv(tmp_path / "test.csv", [("a film", "meh"), ("good", "pos")])
    refused(tmp_path, "labels never seen in training: meh", dataset=str(train_csv), test_file=str(test_csv), **tiny)


def test_too_few_examples(tmp_path, tiny):
    refused(tmp_path, "too few examples", dataset=str(write_csv(tmp_path / "d.csv", toy_examples(4))), **tiny)


def test_sample_sizes_fewer_than_the_classes_name_the_flag(tmp_path, toy_csv, tiny):
    """Not "too few examples (80)": the data is big enough, the flag's value is what is too small."""
    refused(tmp_path, r"^--eval-samples 1 is fewer than the 2 classes of the test split", dataset=toy_csv,
            eval_samples=1, **tiny)
    refused(tmp_path, r"^--train-samples 1 is fewer than the 2 classes of the train split", dataset=toy_csv,
            train_samples=1, **tiny)


def test_label_lists_in_the_test_file_of_a_single_label_run(tmp_path, tiny):
    """The problem is auto and the training labels single: the message says the two files disagree (not "that is
    --problem multi_label (or auto)", which it already is)."""
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"text": t, "label": [label]}) + "\n" for t, label in toy_examples(20)))
    refused(tmp_path, r"^the test split's label column 'label' holds lists \(sets of labels\) and the training data "
            "single labels", dataset=str(write_csv(tmp_path / "train.csv", toy_examples(60))), test_file=str(test_file),
            **tiny)


def test_threshold_on_single_label_data_is_refused(tmp_path, toy_csv, tiny):
    """It would be accepted and never used: a single-label model predicts its likeliest class."""
    refused(tmp_path, r"^--threshold is for multi-label data; .* predict.py --min-confidence", dataset=toy_csv,
            threshold=0.3, **tiny)


def test_empty_texts_are_dropped_or_refused(tmp_path, tiny, capsys):
    rows = toy_examples(100) + [("   ", "pos"), ("", "neg")]
    metrics = train(resolve(dataset=str(write_csv(tmp_path / "d.csv", rows)), output_dir=str(tmp_path / "out"), **tiny))
    assert "Dropped 2 train example(s) with empty text" in capsys.readouterr().out
    assert metrics["test"]["n"] == 20
    refused(tmp_path / "2", "no examples with text",
            dataset=str(write_csv(tmp_path / "e.csv", [(" ", "pos"), ("", "neg")])), **tiny)


def test_max_len_beyond_the_model(tmp_path, toy_csv, tiny):
    refused(tmp_path, r"--max-len 100 is beyond what .* can read \(64 positions\)", dataset=toy_csv,
            **{**tiny, "max_len": 100})


def test_model_that_does_not_exist(tmp_path, toy_csv, tiny):
    refused(tmp_path, "is not a local model folder nor a model on the Hub", dataset=toy_csv,
            **{**tiny, "model": str(tmp_path / "no-model")})


def test_existing_run_is_not_overwritten(tmp_path, toy_csv, tiny):
    train(resolve(dataset=toy_csv, output_dir=str(tmp_path / "out"), **tiny))
    before = (tmp_path / "out" / "metrics.json").read_text()
    with pytest.raises(UserError, match="already holds a run; continue it with --resume, replace it with --overwrite"):
        train(resolve(dataset=toy_csv, output_dir=str(tmp_path / "out"), **tiny))
    assert (tmp_path / "out" / "metrics.json").read_text() == before
    (tmp_path / "out" / "notes.txt").write_text("mine")  # the user's own file in that folder
    metrics = train(resolve(dataset=toy_csv, output_dir=str(tmp_path / "out"), overwrite=True, seed=3, **tiny))
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["seed"] == 3
    assert metrics["config"]["seed"] == 3
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_bad_input_on_the_command_line_is_one_line(tmp_path, tiny_model):
    run = subprocess.run([sys.executable, "train.py", "--model", tiny_model, "--max-len", "32",
                          "--dataset", str(tmp_path / "x.csv")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.csv'}: no such file or folder"]
