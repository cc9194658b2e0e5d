"""Messy data read right or refused in one line: labels that look like numbers, files replaced in place, model folders
without a tokenizer or with the wrong weights, class folders without .txt files, columns of the wrong kind."""
import json
import os
import shutil
from collections import Counter

import pytest

from config import UserError, resolve
from data import fingerprint, load_data
from test_refusals import refused
from toy import toy_examples, write_csv
from train import train


@pytest.fixture
def tiny(tiny_model):
    return dict(model=tiny_model, max_len=32, epochs=1, precision="fp32")


def load(**overrides):
    return load_data(resolve(**{"model": "unused", **overrides}))


def load_refused(message, **overrides):
    with pytest.raises(UserError, match=message) as caught:
        load(**overrides)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def relabel(rows, labels):
    return [(text, labels[i % len(labels)]) for i, (text, _) in enumerate(rows)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_labels_that_look_like_numbers_are_names_in_every_split(tmp_path, tiny):
    """Classes 1, 2, 3, other, shuffled in train; a test file of only numbers (and one of all four): each test
    example keeps its class. They were read as ids once ("1" -> 0, "0" -> id 0...), and `1`/`neg` became one class."""
    train_csv = write_csv(tmp_path / "train.csv", relabel(toy_examples(160), ["3", "other", "1", "2"]))
    numbers_only = write_csv(tmp_path / "numbers.csv", relabel(toy_examples(60, seed=1), ["1", "2", "3"]))
    metrics = train(resolve(dataset=str(train_csv), test_file=str(numbers_only), output_dir=str(tmp_path / "a"),
                            **tiny))
    assert {name: c["support"] for name, c in metrics["test"]["per_class"].items()} == \
        {"1": 20, "2": 20, "3": 20, "other": 0}
    mixed = write_csv(tmp_path / "mixed.csv", relabel(toy_examples(80, seed=2), ["other", "2", "1", "3"]))
    data, names = load(dataset=str(train_csv), test_file=str(mixed))
    assert names == ["1", "2", "3", "other"] and Counter(data["test"]["label"]) == {0: 20, 1: 20, 2: 20, 3: 20}
    for rows in (relabel(toy_examples(40), ["1", "neg"]), relabel(toy_examples(40), [1, "neg"])):  # csv, jsonl
        path = write_csv(tmp_path / "one-neg.csv", rows)
        jsonl = write_jsonl(tmp_path / "one-neg.jsonl", [{"text": t, "label": label} for t, label in rows])
        for dataset in (path, jsonl):
            data, names = load(dataset=str(dataset), val_fraction=0)
            assert names == ["1", "neg"]
            assert Counter(data["train"]["label"]) + Counter(data["test"]["label"]) == {0: 20, 1: 20}
    integers = write_csv(tmp_path / "int.csv", relabel(toy_examples(60), ["10", "-1", "2"]))
    assert load(dataset=str(integers))[1] == ["-1", "2", "10"]  # all integers: sorted as numbers


NA_WORDS = ["NA", "null", "None", "nan", "N/A", "#N/A", "NULL", "n/a"]  # what pandas reads as missing by default


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_words_pandas_takes_for_missing_are_texts_and_classes(tmp_path, suffix):
    """A text "NA" or a class named "None" (intent data has one) is that word: pandas' default NA words made them
    missing values, so the texts were dropped as empty, the class refused as "no label", and predict.py scored "".
    An empty cell is still no text and no label."""
    rows = [(word, ("None", "NA")[i % 2]) for i, word in enumerate(NA_WORDS * 5)] + \
        relabel(toy_examples(40), ["None", "NA"])
    sep = "\t" if suffix == ".tsv" else ","
    path, empty = tmp_path / f"data{suffix}", tmp_path / f"empty{suffix}"
    path.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{label}\n" for t, label in rows))
    empty.write_text(f"text{sep}label\n" + "".join(f"{t}{sep}{label * (i != 3)}\n"  # one label left out
                                                  for i, (t, label) in enumerate(rows)))
    data, names = load(dataset=str(path), val_fraction=0, test_fraction=0.5)
    assert names == ["NA", "None"]
    texts = list(data["train"]["text"]) + list(data["test"]["text"])
    assert len(texts) == len(rows) and sorted(t for t in texts if t in NA_WORDS) == sorted(NA_WORDS * 5)
    from predict import read_texts
    assert read_texts(path)[:len(NA_WORDS)] == NA_WORDS
    one_column = tmp_path / f"one{suffix}"
    one_column.write_text("text\nNA\n\nfine\n")  # a blank line was dropped: 3 rows in, 2 out, the rows shifted
    assert read_texts(one_column) == ["NA", "", "fine"]
    load_refused("1 training example\\(s\\) have no label", dataset=str(empty), val_fraction=0, test_fraction=0.5)


def test_test_texts_seen_in_training_and_texts_labelled_both_ways_are_said_and_kept(tmp_path, tiny, capsys):
    """The training file given again as --test-file (every test text seen in training: scores that say nothing of new
    texts), and a text labelled both ways: one warning line each, the counts in metrics.json. Counted apart from
    data.duplicates: test rows that are training rows, whitespace aside."""
    rows = toy_examples(80)
    rows += [(rows[0][0], "pos" if rows[0][1] == "neg" else "neg"), (rows[1][0], rows[1][1])]  # labelled both ways
    train_csv = write_csv(tmp_path / "train.csv", rows)
    test_csv = write_csv(tmp_path / "test.csv", [("  " + text.replace(" ", "  "), label) for text, label in rows[:30]]
                         + toy_examples(10, seed=7, names=("neg", "pos")))
    unseen = sum(text not in {t for t, _ in rows} for text, _ in toy_examples(10, seed=7))
    metrics = train(resolve(dataset=str(train_csv), test_file=str(test_csv), val_fraction=0,
                            output_dir=str(tmp_path / "run"), **tiny))
    printed = capsys.readouterr().out
    assert metrics["duplicates"] == {"validation_in_train": None, "test_in_train": 40 - unseen,
                                     "conflicting_in_train": 1}
    assert f"Warning: {40 - unseen} of 40 test texts are also training texts, word for word" in printed
    assert "Warning: 1 training texts occur more than once with different labels" in printed
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["duplicates"] == metrics["duplicates"]
    clean = train(resolve(dataset=str(write_csv(tmp_path / "clean.csv", toy_examples(80))),
                          output_dir=str(tmp_path / "clean"), **tiny))
    assert "are also training texts" not in capsys.readouterr().out or clean["duplicates"]["test_in_train"]


def test_a_file_replaced_with_the_same_mtime_is_read_again(tmp_path):
    """cp -p, rsync, an unpacked archive: new content, old modification time. The cache follows the content."""
    path = tmp_path / "data.csv"
    write_csv(path, relabel(toy_examples(40), ["neg", "pos"]))
    stamp = os.stat(path).st_mtime_ns
    assert load(dataset=str(path))[1] == ["neg", "pos"]
    write_csv(path, relabel(toy_examples(40), ["bad", "ok!"]))  # the same size, too
    os.utime(path, ns=(stamp, stamp))
    data, names = load(dataset=str(path))
    assert names == ["bad", "ok!"] and set(data["train"].features["label"].names) == {"bad", "ok!"}


def test_a_model_folder_without_tokenizer_files_is_refused(tmp_path, toy_csv, tiny, tiny_model):
    """Its tokenizer would be 5 special tokens: every word [UNK]."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), folder)
    message = refused(tmp_path, r"reads 100% of the training texts' tokens as unknown \(\[UNK\]\): .* has no "
                      r"tokenizer files \(tokenizer.json, vocab.txt", dataset=toy_csv, **{**tiny, "model": str(folder)})
    assert str(folder) in message


def test_class_folders_without_txt_files_are_refused_not_skipped(tmp_path):
    rows = toy_examples(40)
    for i, (text, label) in enumerate(rows):  # neg/*.txt and pos/*.TXT, *.Txt: both classes
        (tmp_path / "news" / label).mkdir(parents=True, exist_ok=True)
        suffix = ".txt" if label == "neg" else (".TXT", ".Txt")[i % 2]
        (tmp_path / "news" / label / f"{i}{suffix}").write_text(text)
    data, names = load(dataset=str(tmp_path / "news"))
    assert names == ["neg", "pos"] and sum(len(split) for split in data.values()) == 40
    (tmp_path / "news" / "sport").mkdir()
    (tmp_path / "news" / "sport" / "notes.md").write_text("not a text")
    load_refused(f"{tmp_path / 'news' / 'sport'}: a class folder without .txt files", dataset=str(tmp_path / "news"))
    shutil.rmtree(tmp_path / "news" / "sport")
    (tmp_path / "news" / "pos" / "gone.txt").symlink_to(tmp_path / "nowhere")
    load_refused(f"{tmp_path / 'news' / 'pos' / 'gone.txt'}: not readable", dataset=str(tmp_path / "news"))


def bad_jsonl(tmp_path, name, make):
    return write_jsonl(tmp_path / f"{name}.jsonl", [make(t, label) for t, label in toy_examples(40)])


CASES = {  # name: (file maker, overrides, the message)
    "numbers as texts": (lambda p: bad_jsonl(p, "n", lambda t, l: {"text": len(t), "label": l}), {},
                         "the text column 'text' holds numbers, not text; name the column of texts with --text-col"),
    "numbers as texts, csv": (lambda p: write_csv(p / "n.csv", [(len(t), l) for t, l in toy_examples(40)]), {},
                              "the text column 'text' holds numbers, not text"),
    "dicts as texts": (lambda p: bad_jsonl(p, "d", lambda t, l: {"text": {"t": t}, "label": l}), {},
                       "the text column 'text' holds dicts, not text"),
    "lists as texts": (lambda p: bad_jsonl(p, "l", lambda t, l: {"text": [t], "label": l}), {},
                       "the text column 'text' holds lists, not text"),
    "lists as labels, single-label asked": (lambda p: bad_jsonl(p, "ll", lambda t, l: {"text": t, "label": [l]}),
                                            {"problem": "single_label"}, r"the label column 'label' holds lists "
                                            r"\(several labels per text\): that is --problem multi_label"),
    "one column for both": (lambda p: write_csv(p / "d.csv", toy_examples(40)), {"text_column": "label"},
                            "the text and the label column are the same column 'label'; name the other one with "
                            "--label-column"),
    "one column for both, too": (lambda p: write_csv(p / "d.csv", toy_examples(40)), {"label_column": "text"},
                                 "the same column 'text'; name the other one with --text-column"),
    "malformed JSON Lines": (lambda p: (p / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", '
                                                                   '"label": \n') and str(p / "bad.jsonl"), {},
                             r"bad.jsonl: line 2: not valid JSON \(Expecting value\)"),
    "malformed csv": (lambda p: (p / "bad.csv").write_text('text,label\n"a,1\nb,2\n') and str(p / "bad.csv"), {},
                      "bad.csv: could not be read as csv: Error tokenizing data. C error: EOF inside string"),
    "empty file": (lambda p: (p / "e.csv").write_text("") or str(p / "e.csv"), {}, r"e.csv: empty$"),
    "empty jsonl": (lambda p: (p / "e.jsonl").write_text("\n") and str(p / "e.jsonl"), {}, r"e.jsonl: empty$"),
    "only a header": (lambda p: write_csv(p / "h.csv", []), {}, r"h.csv: no examples in it$"),
}


@pytest.mark.parametrize("case", CASES)
def test_wrong_kinds_of_data_are_one_line(tmp_path, case):
    make, overrides, message = CASES[case]
    load_refused(message, dataset=str(make(tmp_path)), **overrides)


def test_mixed_json_labels_are_names(tmp_path):
    path = bad_jsonl(tmp_path, "m", lambda t, l: {"text": t, "label": 7 if l == "pos" else "neg"})
    assert load(dataset=path)[1] == ["7", "neg"]


def test_weights_that_do_not_load_are_one_line(tmp_path, toy_csv, tiny, tiny_model):
    import torch
    from safetensors.torch import load_file
    bin_only, truncated = tmp_path / "bin-only", tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    shutil.copytree(tiny_model, bin_only, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(os.path.join(tiny_model, "model.safetensors")), bin_only / "pytorch_model.bin")
    refused(tmp_path, r"could not load the weights of .*bin-only \(safetensors\): .*no file named "
            "model.safetensors", dataset=toy_csv, **{**tiny, "model": str(bin_only)})
    refused(tmp_path, r"could not load the weights of .*truncated \(safetensors\): .*incomplete",
            dataset=toy_csv, **{**tiny, "model": str(truncated)})


@pytest.mark.parametrize("seed", [-1, 2**32, 99999999999])
def test_seeds_out_of_range_are_refused(seed):
    with pytest.raises(UserError, match=rf"--seed must be in 0..4294967295 .*, not {seed}$"):
        resolve(seed=seed)


def test_fingerprint_follows_every_text_and_label(tmp_path):
    """Stable across two loads of the same file; another one for one changed label or one changed text."""
    rows = toy_examples(100)
    path = write_csv(tmp_path / "d.csv", rows)
    first = fingerprint(*load(dataset=str(path)))
    assert first == fingerprint(*load(dataset=str(path))) and len(first) == 16
    one_label, one_text = list(rows), list(rows)
    one_label[57] = (rows[57][0], "neg" if rows[57][1] == "pos" else "pos")
    one_text[57] = (rows[57][0] + " film", rows[57][1])
    for variant in (one_label, one_text):
        assert fingerprint(*load(dataset=str(write_csv(tmp_path / "v.csv", variant)))) != first


def write_everywhere(folder, rows):
    """The same (text, label) rows as csv, tsv, a JSON array, JSON Lines, parquet and a folder of class folders."""
    import pandas
    frame = pandas.DataFrame(rows, columns=["text", "label"])
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "d.csv", index=False)
    frame.to_csv(folder / "d.tsv", sep="\t", index=False)
    (folder / "d.json").write_text(json.dumps([{"text": t, "label": label} for t, label in rows]))
    write_jsonl(folder / "d.jsonl", [{"text": t, "label": label} for t, label in rows])
    frame.to_parquet(folder / "d.parquet")
    files = [folder / f"d.{ext}" for ext in ("csv", "tsv", "json", "jsonl", "parquet")]
    if all(isinstance(label, str) for _, label in rows):
        for i, (text, label) in enumerate(rows):
            (folder / "classes" / label).mkdir(parents=True, exist_ok=True)
            (folder / "classes" / label / f"{i}.txt").write_text(text)
        files.append(folder / "classes")
    return files


def test_label_names_are_stripped_in_every_format_and_split(tmp_path):
    """'pos', ' pos' and 'pos ' are one class, in every format, and a test file's 'neg ' is training's neg. They
    were three classes (a csv with a trailing space on one row in five: 4 classes, test accuracy 0.375)."""
    rows = relabel(toy_examples(60), ["neg", "pos", "neg ", " pos", "pos "])
    test = write_csv(tmp_path / "test.csv", relabel(toy_examples(20, seed=1), [" neg", "pos  "]))
    for path in write_everywhere(tmp_path / "train", rows):
        data, names = load(dataset=str(path), test_file=str(test))
        assert names == ["neg", "pos"], path
        assert Counter(data["test"]["label"]) == {0: 10, 1: 10}
        assert sum(len(split) for name, split in data.items() if name != "test") == 60
    # a Hub-style ClassLabel whose names have spaces (datasets keeps the feature in the parquet file)
    from datasets import ClassLabel, Dataset, Features, Value
    hub = Dataset.from_dict({"text": [t for t, _ in rows], "label": [i % 2 for i in range(60)]},
                            features=Features({"text": Value("string"), "label": ClassLabel(names=[" neg", "pos "])}))
    hub.to_parquet(tmp_path / "hub.parquet")
    data, names = load(dataset=str(tmp_path / "hub.parquet"))
    assert names == ["neg", "pos"] and data["train"].features["label"].names == ["neg", "pos"]
    assert sum((Counter(split["label"]) for split in data.values()), Counter()) == {0: 30, 1: 30}
    # an empty name leaves a single-label text unlabelled: refused, as an empty cell always was
    blank = relabel(toy_examples(20), ["neg", "pos", "neg", "  "])
    for path in write_everywhere(tmp_path / "blank", blank)[:5]:
        load_refused(r"5 training example\(s\) have no label; fill them in or remove them", dataset=str(path))


def test_label_sets_are_stripped_and_an_empty_name_is_no_label(tmp_path):
    """In JSON lists "pos", " pos" and "pos " were three labels, and "" a label with an empty name."""
    rows = [(text, [["pos", " pos"], ["pos ", ""], [""], [" music", "pos"]][i % 4])
            for i, (text, _) in enumerate(toy_examples(80))]
    path = write_jsonl(tmp_path / "sets.jsonl", [{"text": t, "labels": labels} for t, labels in rows])
    data, names = load(dataset=path)
    assert names == ["music", "pos"]
    sets = [tuple(v) for split in data.values() for v in split["label"]]
    assert Counter(sets) == {(0.0, 1.0): 40, (0.0, 0.0): 20, (1.0, 1.0): 20}
    csv_rows = [(text, [" pos ;music", "pos; ", " ", "music"][i % 4]) for i, (text, _) in enumerate(toy_examples(80))]
    data, names = load(dataset=str(write_csv(tmp_path / "sets.csv", csv_rows)), label_sep=";")
    assert names == ["music", "pos"]
    assert Counter(tuple(v) for split in data.values() for v in split["label"]) == \
        {(1.0, 1.0): 20, (0.0, 1.0): 20, (0.0, 0.0): 20, (1.0, 0.0): 20}


def test_labels_that_differ_only_in_case_are_named_in_one_warning(tmp_path, capsys):
    rows = relabel(toy_examples(60), ["pos", "Pos", "neg", "NEG", "neg"])
    data, names = load(dataset=str(write_csv(tmp_path / "d.csv", rows)))
    assert names == ["NEG", "Pos", "neg", "pos"]  # not merged: they may be meant apart
    warnings = [line for line in capsys.readouterr().out.splitlines() if "differ only in case" in line]
    assert warnings == ["Warning: labels that differ only in case are separate classes: NEG / neg; Pos / pos; "
                        "write them alike in the data if they are one"]


@pytest.mark.parametrize("cells", [["['cast', 'music']", "['music']", "[]"], ['["cast","music"]', '["pos"]', "[]"]])
def test_lists_written_in_csv_cells_are_refused_with_label_sep_too(tmp_path, cells):
    """A pandas export of label lists: cut at --label-sep ',' it gave nine garbage labels ("['cast'", " 'music']"),
    and [] a label named []. Refused in one line, with --label-sep or --problem multi_label, as without them."""
    path = write_csv(tmp_path / "lists.csv", relabel(toy_examples(30), cells))
    for overrides in (dict(label_sep=","), dict(label_sep=";"), dict(problem="multi_label"), {}):
        message = load_refused(r"lists written as text", dataset=str(path), **overrides)
        assert "[" in message and "--label-sep" in message
    only_empty = write_csv(tmp_path / "empty-lists.csv", relabel(toy_examples(30), ["music", "[]", "cast;music"]))
    load_refused(r"the train split's label column holds lists written as text \(\[\]\)", dataset=str(only_empty),
                 label_sep=";")


def test_a_class_the_test_split_lacks_is_named():
    """Its F1 on the test split is 0 and macro-F1 averages it in: said, single-label and multi-label alike."""
    from datasets import Dataset
    from data import describe_absent
    single = {"train": Dataset.from_dict({"label": [0, 1, 2]}), "test": Dataset.from_dict({"label": [0, 0, 2]})}
    assert describe_absent(single, ["neg", "neutral", "pos"]) == \
        "\nNo test example has the class(es) neutral: its F1 there counts as 0 in macro-F1"
    multi = {"validation": Dataset.from_dict({"label": [[1.0, 0.0], [1.0, 0.0]]})}
    assert "No validation example has the label(s) b" in describe_absent(multi, ["a", "b"])
    assert describe_absent({"test": Dataset.from_dict({"label": [0, 1]})}, ["neg", "pos"]) == ""


def test_a_column_named_twice_is_refused(tiny_model, tmp_path):
    """pandas renames the second 'text' to 'text.1' and the first was used without a word: in train.py and
    predict.py alike, one line."""
    import predict
    for header in ("text,label,text", "text,label,label"):
        path = tmp_path / f"{header.replace(',', '-')}.csv"
        path.write_text(header + "\n" + "\n".join(f"{t},{l},{l if header.endswith('label') else t}"
                                                  for t, l in toy_examples(20)) + "\n")
        name = header.rsplit(",", 1)[1]
        with pytest.raises(UserError, match=f"two columns are named '{name}'; rename one"):
            train(resolve(model=tiny_model, dataset=str(path), max_len=32, output_dir=str(tmp_path / "out")))
        with pytest.raises(UserError, match=f"two columns are named '{name}'"):
            list(predict.text_chunks(path, None, "utf-8"))
    assert not (tmp_path / "out").exists()
