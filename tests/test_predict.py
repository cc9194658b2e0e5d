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


def test_predict_function_takes_one_text_and_refuses_bad_values(trained):
    """A bare string was read as its characters (9 results for "great fun"); top_k 0 gave empty probs, -1 dropped a
    class, batch_size 0 and max_len 2.5 were raw exceptions. One text is a list of one, as a pipeline takes it."""
    from predict import predict
    assert predict("a wonderful and brilliant film", trained) == predict(["a wonderful and brilliant film"], trained)
    assert len(predict("great fun", trained)) == 1
    for bad, said in ((dict(top_k=0), "top_k must be an integer of at least 1, not 0"),
                      (dict(top_k=-1), "top_k must be"), (dict(batch_size=0), "batch_size must be"),
                      (dict(max_len=2.5), "max_len must be an integer of at least 1, not 2.5"),
                      (dict(texts=None), "texts must be a list of texts")):
        with pytest.raises(UserError, match=said):
            predict(**{"texts": ["a film"], "model_dir": trained, **bad})
    assert predict((t for t in ["good", "bad"]), trained)[1]["text"] == "bad"  # any iterable of texts


def test_csv_class_columns_never_repeat_a_fixed_column():
    """A class named label or score gave the header text,label,score,label,score (pandas: label.1): p_NAME then."""
    import pandas
    from predict import write_results
    row = {"text": "x", "label": "score", "score": 0.9, "probs": {"score": 0.9, "label": 0.1}}
    for names, header in ((["label", "score"], ["text", "label", "score", "p_label", "p_score"]),
                          (["neg", "pos"], ["text", "label", "score", "neg", "pos"])):
        out = io.StringIO()
        write_results([{**row, "probs": dict(zip(names, (0.1, 0.9)))}], out, "csv", names)
        table = pandas.read_csv(io.StringIO(out.getvalue()), keep_default_na=False)
        assert list(table.columns) == header and table.iloc[0, 3:].tolist() == [0.1, 0.9]


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


def test_a_pretrained_encoder_without_a_trained_head_is_refused(tiny_model, tmp_path):
    """The checkpoint a run starts from, given to predict.py, serve.py or export.py by mistake: its head would be
    random, every label noise (LABEL_1 at 0.50), with exit 0. One line and exit 2, in a real process."""
    import socket
    with socket.socket() as s:  # a port free right now: serve.py checks it before it loads the model
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for script in ("predict.py", "serve.py", "export.py"):
        args = ["some text"] if script == "predict.py" else ["--port", port] if script == "serve.py" else []
        run = subprocess.run([sys.executable, str(ROOT / script), tiny_model, *args], capture_output=True, text=True,
                             cwd=tmp_path)
        assert run.returncode == 2 and run.stdout == "", (script, run.stderr)
        assert run.stderr.startswith(f"error: {tiny_model} is not a trained classifier: ") and \
            run.stderr.count("\n") == 1, (script, run.stderr)


def test_threshold_is_refused_for_a_single_label_model(trained):
    run = cli(trained, "A wonderful film.", "--threshold", "0.5")
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --threshold is for multi-label models: a single-label model abstains below --min-confidence"]


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


# ---- inputs and refusals: in-process through main() (a subprocess costs ~6 s of imports here), plus a real one

def run_main(module, *args, stdin=b""):
    """(exit code, stdout, stderr) of module.main(args) run here, with `stdin` as standard input's bytes."""
    import contextlib
    out, err = io.StringIO(), io.StringIO()
    code = 0
    old_stdin, sys.stdin = sys.stdin, io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


def refused(result, starts):
    code, out, err = result
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), result
    assert err.startswith(f"error: {starts}"), err
    return err


def test_csv_has_every_true_probability_whatever_top_k(trained):
    import predict
    texts = ["a great film", "an awful film"]
    code, out, _ = run_main(predict, trained, "--format", "csv", "--top-k", "1", *texts)
    rows = list(csv.DictReader(io.StringIO(out)))
    expected = predict.predict(texts, trained)
    assert code == 0 and [r["text"] for r in rows] == texts
    for row, want in zip(rows, expected):
        assert {n: float(row[n]) for n in ("neg", "pos")} == pytest.approx(want["probs"], abs=1e-6)
        assert min(want["probs"].values()) > 0.01  # the class top-k cuts from probs: not written as 0
    code, out, _ = run_main(predict, trained, "--top-k", "1", *texts)  # JSON: top-k limits probs
    assert [len(json.loads(line)["probs"]) for line in out.splitlines()] == [1, 1]
    cut = io.StringIO()  # results whose probs were cut (predict(top_k=...)): an empty cell, never a false 0
    predict.write_results(predict.predict(texts, trained, top_k=1), cut, "csv", ["neg", "pos"])
    assert [row.count(",,") + row.endswith(",") for row in cut.getvalue().splitlines()[1:]] == [1, 1]


def test_lines_split_on_newline_only():
    from predict import split_lines
    assert split_lines("") == [] and split_lines("\n") == [""] and split_lines("a\n\nb") == ["a", "", "b"]
    assert split_lines("a\r\nb\r\n") == ["a", "b"] and split_lines("a\rb\fc\x85d\u2028e\u2029f\x0bg\x1ch") == [
        "a\rb\fc\x85d\u2028e\u2029f\x0bg\x1ch"]


def test_row_i_is_input_line_i_from_stdin_and_file(trained, tmp_path):
    import predict
    lines = ["a great\u2028film", "bad\x0cfilm\x85 and \u2029 dull", "", "an awful\x1efilm\x0b"]
    data = "\r\n".join(lines[:2]) + "\n" + "\n".join(lines[2:]) + "\n"  # \r\n and \n; one final newline
    (tmp_path / "in.txt").write_bytes(data.encode())
    for args, stdin in (((), data.encode()), (("--file", tmp_path / "in.txt"), b"")):
        code, out, _ = run_main(predict, trained, *args, stdin=stdin)
        rows = [json.loads(line) for line in out.splitlines()]  # U+2028 & co. escaped: even splitlines() is safe
        assert code == 0 and [r["text"] for r in rows] == lines
        code, out, _ = run_main(predict, trained, "--format", "csv", *args, stdin=stdin)
        assert [r["text"] for r in csv.DictReader(io.StringIO(out, newline=""))] == lines


def test_texts_may_follow_options(trained):
    import predict
    code, out, _ = run_main(predict, trained, "--top-k", "2", "a great film", "--format", "jsonl", "an awful film")
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["a great film", "an awful film"]


def test_numbers_and_empty_cells_of_a_csv_text_column(trained, tmp_path):
    import predict
    (tmp_path / "numbers.csv").write_text("id,text\n1,5\n2,\n3,0\n4,12\n")  # integers with a gap: read as floats
    (tmp_path / "mixed.jsonl").write_text('{"text": 2.5}\n{"text": null}\n{"text": "a great film"}\n')
    assert predict.read_texts(tmp_path / "numbers.csv") == ["5", "", "0", "12"]
    assert predict.read_texts(tmp_path / "mixed.jsonl") == ["2.5", "", "a great film"]
    code, out, err = run_main(predict, trained, "--file", tmp_path / "numbers.csv", "--format", "csv")
    assert code == 0 and [r["text"] for r in csv.DictReader(io.StringIO(out))] == ["5", "", "0", "12"]
    assert "Note: 1 of 4 texts are empty" in err  # scored, row kept, and said
    assert "are empty" not in run_main(predict, trained, "a great film")[2]
    (tmp_path / "lists.jsonl").write_text('{"text": ["a", "b"]}\n')
    refused(run_main(predict, trained, "--file", tmp_path / "lists.jsonl"), "the text column holds lists")


def test_refusals_are_one_line_and_harm_nothing(trained, tmp_path):
    import predict
    kept = tmp_path / "kept.jsonl"
    kept.write_text("an earlier result\n")
    not_a_model = tmp_path / "nothing-here"  # refused before the model would load: it is not even looked at
    refused(run_main(predict, not_a_model, "--output", tmp_path / "missing" / "out.jsonl", "x"),
            f"--output {tmp_path / 'missing' / 'out.jsonl'}: no such folder")
    refused(run_main(predict, not_a_model, "--output", tmp_path, "x"), f"--output {tmp_path} is a folder")
    for bad in ("-5", "0"):
        refused(run_main(predict, not_a_model, "--max-len", bad, "x"), f"--max-len must be at least 1, not {bad}")
    refused(run_main(predict, not_a_model, "--top-k", "0", "x"), "--top-k must be at least 1")
    refused(run_main(predict, not_a_model, "--encoding", "bogus", "x"), "unknown --encoding 'bogus'")
    refused(run_main(predict, trained, "--file", kept, "--encoding", "bogus"), "unknown --encoding 'bogus'")
    refused(run_main(predict, trained, "--output", kept, "--max-len", "2", "x"), "max_len 2 leaves no room for text")
    refused(run_main(predict, trained, "--output", kept, stdin=b"caf\xe9\n"), "standard input, line 1: not valid utf-8")
    refused(run_main(predict, trained, "--output", kept, "ok", "caf\udce9"), "text argument 2 is not valid")
    refused(run_main(predict, trained, "--output", kept, stdin=b""), "no texts")
    refused(run_main(predict, trained, "--output", kept, "--max-len", "100000", "x"),
            "max_len 100000 is beyond what this model can read")  # it was cut to the model's limit without a word
    refused(run_main(predict, trained, "--file", kept, "--output", kept), f"--output {kept} is the --file it reads")
    assert kept.read_text() == "an earlier result\n"
    config = (trained / "config.json").read_bytes()
    refused(run_main(predict, trained, "x", "--output", trained / "config.json"),
            f"--output {trained / 'config.json'} is inside the model's folder")
    assert (trained / "config.json").read_bytes() == config
    code, _, _ = run_main(predict, trained, "--output", kept, "--encoding", "latin-1", stdin=b"caf\xe9\n")
    assert code == 0 and json.loads(kept.read_text())["text"] == "café"


def test_broken_model_folders(trained, tmp_path):
    import shutil
    import predict
    for name in ("config.json", "tokenizer.json"):
        folder = shutil.copytree(trained, tmp_path / name)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
        refused(run_main(predict, folder, "x"), f"{folder}: could not load the model (")
    folder = shutil.copytree(trained, tmp_path / "no-tokenizer")
    for f in folder.glob("tokenizer*"):
        f.unlink()  # transformers would make an empty tokenizer: every word unknown, labels wrong, no error
    refused(run_main(predict, folder, "x"), f"{folder}: no tokenizer files")
    folder = shutil.copytree(trained, tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    run = cli(folder, "x")  # a real process: one line, no traceback
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"error: {folder}: could not load the model (") and run.stderr.count("\n") == 1


def test_export_refuses_before_writing_anything(trained, tmp_path):
    import export
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    refused(run_main(export, tmp_path / "nothing-here", "--output-dir", a_file), f"--output-dir {a_file} is a file")
    assert a_file.read_text() == "not a folder"
    (tmp_path / "empty.txt").write_text("")
    refused(run_main(export, trained, "--file", tmp_path / "empty.txt", "--output-dir", tmp_path / "onnx"),
            f"{tmp_path / 'empty.txt'}: no texts")
    refused(run_main(export, trained, "--samples", "0", "--output-dir", tmp_path / "onnx"), "--samples must be")
    assert not (tmp_path / "onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# Scoring a file of any size: read in chunks, rows written as they come, memory flat; several processes

def test_every_format_is_read_in_chunks_in_order(tmp_path):
    import io as bytes_io
    import pandas
    import predict
    texts = [f"text {i}" for i in range(23)] + ["", "café 5"]
    frame = pandas.DataFrame({"id": range(len(texts)), "text": texts})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True, force_ascii=False)
    frame.to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    for name in ("t.csv", "t.tsv", "t.jsonl", "t.parquet", "t.txt"):
        chunks = list(predict.text_chunks(tmp_path / name, size=7))
        assert [len(texts) for texts, _ in chunks] == [7, 7, 7, 4], name
        assert [t for chunk, _ in chunks for t in chunk] == texts and chunks[-1][1] == pytest.approx(1), name
        assert predict.read_texts(tmp_path / name) == texts
    # a character cut between two blocks, a \r\n cut likewise: decoded and split as if read at once
    data = bytes_io.BytesIO("café\r\nnaïve\n\nx".encode())
    assert [t for chunk, _ in predict.line_chunks(data, "here", "utf-8", block=3) for t in chunk] == [
        "café", "naïve", "", "x"]
    bad = bytes_io.BytesIO(b"fine\nfine\ncaf\xe9\n")
    with pytest.raises(UserError, match="here, line 3: not valid utf-8"):
        list(predict.line_chunks(bad, "here", "utf-8", block=4))


def run_measured(*args):
    """predict.py in a process of its own: its exit status and peak resident memory (MB, from the kernel)."""
    import os
    process = subprocess.Popen([sys.executable, "predict.py", *map(str, args)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return status, usage.ru_maxrss / 1024


def test_memory_does_not_grow_with_the_number_of_rows(trained, tmp_path):
    from toy import toy_examples
    lines = [text for text, _ in toy_examples(500, seed=4)]
    peaks = {}
    for n in (20_000, 200_000):
        (tmp_path / "in.txt").write_text("".join(lines[i % 500] + "\n" for i in range(n)))
        status, peaks[n] = run_measured(trained, "--file", tmp_path / "in.txt", "--output", tmp_path / "out.jsonl")
        with open(tmp_path / "out.jsonl") as f:
            count = sum(1 for _ in f)
        assert status == 0 and count == n
    first = [json.loads(line) for line in open(tmp_path / "out.jsonl").readlines()[:500]]
    assert [r["text"] for r in first] == lines
    assert peaks[200_000] < peaks[20_000] * 1.1, peaks  # measured here: 600 and 637 MB; all rows held: 100s of MB more


def test_two_processes_write_one_output_in_input_order(trained, tmp_path):
    """torchrun (as tests/test_distributed.py): 10,000 lines are 3 chunks, 0 and 2 for one process, 1 for the other;
    the output is the one process's, row for row."""
    import os
    from toy import toy_examples
    lines = [text for text, _ in toy_examples(10_000, seed=5)]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for fmt in ("jsonl", "csv"):
        single = cli(trained, "--file", tmp_path / "in.txt", "--format", fmt, "--output", tmp_path / f"one.{fmt}")
        assert single.returncode == 0, single.stderr
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "predict.py", str(trained), "--file", str(tmp_path / "in.txt"), "--format", fmt,
                              "--output", str(tmp_path / f"two.{fmt}")], cwd=ROOT, capture_output=True, text=True,
                             env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        two, one = (tmp_path / f"two.{fmt}").read_text(), (tmp_path / f"one.{fmt}").read_text()
        if fmt == "jsonl":
            rows = [json.loads(line) for line in two.splitlines()]
            assert [r["text"] for r in rows] == lines  # every row once, in input order
            for a, b in zip(rows, map(json.loads, one.splitlines())):
                assert a["label"] == b["label"] and a["score"] == pytest.approx(b["score"], abs=1e-6)
        else:
            assert [r["text"] for r in csv.DictReader(io.StringIO(two))] == lines  # one header
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predict-")]  # the parts are gone


def test_two_processes_that_cannot_write_stop_with_one_line(trained, tmp_path):
    """Under torchrun, an output folder where nothing can be written (/proc, even for root): every process stops
    with the same one-line error and exit code 2, none waits for the others, no traceback from predict.py."""
    import os
    (tmp_path / "in.txt").write_text("a good film\na dull film\n")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "predict.py", str(trained), "--file", str(tmp_path / "in.txt"),
                          "--output", "/proc/predict-out.jsonl"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    # the same line from each process (torchrun may stop the second before it prints: then only one)
    assert errors in [["error: --output /proc/predict-out.jsonl: could not write (No such file or directory)"] * n
                      for n in (1, 2)]
    # torchrun reports its failed children with a traceback of its own; none comes from predict.py itself
    assert 'predict.py", line' not in run.stderr and run.returncode != 0
    assert "exitcode  : 2" in run.stderr  # the first to end (torchrun then stops the other) had the user-error code
