"""Text pairs (--text-pair-column, or two columns of the usual names): the tokenizer's pair encoding in training,
predict.py and export.py. A task that needs both texts is learned, and one text alone is not enough for it."""
import csv
import io
import json
import random

import pytest
import torch
from accelerate import Accelerator
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel, BertTokenizer,
                          DataCollatorWithPadding)

from toy import FILLER, NEGATIVE, POSITIVE, SPECIAL, write_csv, write_tiny_model
from config import UserError, resolve
from data import fingerprint, load_data, make_loaders, tokenize
from analysis import scores
from test_distributed import torchrun
from test_messy_data import load, load_refused, write_jsonl
from test_predict import refused, run_main
from train import split_logits, train

HEADER = ("sentence1", "sentence2", "label")
RUN = dict(max_len=32, batch_size=16, eval_batch_size=32, epochs=6, lr=3e-3, warmup_ratio=0.1, precision="fp32")


def sentence(rng, positive):
    words = rng.choices(FILLER, k=rng.randint(2, 6)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def agreement_pairs(n, seed=0):
    """n (sentence1, sentence2, label) rows: each sentence holds one sentiment word among filler words; the label is
    "same" when both words are of one side, else "different" (an XOR). The four combinations come equally often, so
    either sentence alone says nothing about the label: reading one of them, a model is at chance (50%)."""
    rng = random.Random(seed)
    rows = [(sentence(rng, i % 2), sentence(rng, i // 2 % 2), "same" if i % 2 == i // 2 % 2 else "different")
            for i in range(n)]
    rng.shuffle(rows)
    return rows


def contradictions(n, seed):
    """n pairs, each twice: once with each label. Whatever the model predicts, one of each is a mistake."""
    return [(a, b, label) for a, b, _ in agreement_pairs(n, seed) for label in ("same", "different")]


@pytest.fixture(scope="module")
def encoder(toy_csv, tmp_path_factory):
    """A tiny model fine-tuned on the toy sentiment task first: an encoder that knows the words' sentiment, as a
    pretrained one would. From random weights the tiny model does not find the pairs' XOR in seconds (tried: 20
    epochs at chance). From this one 6 epochs learn it, but not from every initialization of so small a model: of
    the seeds 0 to 3, seeds 1 and 3 reached 0.98 test accuracy, 0 and 2 stayed at 0.5 (all four learned the sentiment
    task itself, 0.975 to 1.0). Hence its own seed, and a check that the warm-up worked."""
    folder = tmp_path_factory.mktemp("encoder")
    model = write_tiny_model(folder / "random", seed=1)
    metrics = train(resolve(model=model, dataset=toy_csv, output_dir=str(folder / "run"), audit=False, **RUN))
    assert metrics["test"]["accuracy"] >= 0.95
    return str(folder / "run" / "best")


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return (str(write_csv(folder / "train.csv", agreement_pairs(800) + contradictions(2, seed=5), HEADER)),
            str(write_csv(folder / "test.csv", agreement_pairs(100, seed=1) + contradictions(2, seed=6), HEADER)))


@pytest.fixture(scope="module")
def pair_run(encoder, pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("pair-run") / "run"
    metrics = train(resolve(model=encoder, dataset=pair_files[0], test_file=pair_files[1], output_dir=str(out),
                            **RUN))
    return metrics, out


# ---------------------------------------------------------------------------------------------------------------
# Learning: both texts are read

def test_a_task_that_needs_both_texts_is_learned_and_not_from_one(pair_run, encoder, pair_files, tmp_path):
    metrics, out = pair_run
    assert metrics["test"]["n"] == 104 and metrics["test"]["accuracy"] >= 0.9  # at most 102 of 104: 2 contradict
    assert json.loads((out / "best" / "config.json").read_text())["text_pair"] is True
    card = (out / "best" / "README.md").read_text()
    assert 'classify({"text": "The first text", "text_pair": "The second text"})' in card  # its usage: a pair
    one_text = train(resolve(model=encoder, dataset=pair_files[0], test_file=pair_files[1], text_column="sentence1",
                             output_dir=str(tmp_path / "one"), audit=False, **RUN))
    assert one_text["test"]["accuracy"] <= 0.65  # chance is 0.5: sentence1 alone does not tell
    assert json.loads((tmp_path / "one" / "best" / "config.json").read_text())["text_pair"] is False


def test_mistakes_and_suspect_labels_show_both_texts(pair_run, pair_files):
    _, out = pair_run
    test = set(map(tuple, csv.reader(open(pair_files[1]))))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert all(list(e)[:3] == ["text", "text_pair", "label"] for e in errors)
    assert {(e["text"], e["text_pair"], e["label"]) for e in errors} <= test  # each mistake with its own pair
    assert {(a, b) for a, b, _ in contradictions(2, seed=6)} <= {(e["text"], e["text_pair"]) for e in errors}
    suspects = [json.loads(line) for line in (out / "suspect_labels.jsonl").read_text().splitlines()]
    assert {(a, b) for a, b, _ in contradictions(2, seed=5)} <= {(s["text"], s["text_pair"]) for s in suspects}


# ---------------------------------------------------------------------------------------------------------------
# Reading pair data

def test_pairs_are_found_by_name_in_any_case_and_empty_ones_dropped(tmp_path, capsys):
    rows = agreement_pairs(40)
    records = [{"id": i, "Premise": a, "HYPOTHESIS": b, "text": "not this one", "label": label}
               for i, (a, b, label) in enumerate(rows)]
    records[3]["HYPOTHESIS"], records[7]["Premise"] = "  ", None  # an empty pair, a missing text: both dropped
    path = write_jsonl(tmp_path / "nli.jsonl", records)
    data, names = load(dataset=path, val_fraction=0)
    out = capsys.readouterr().out
    assert "Text pairs: 'Premise' and 'HYPOTHESIS', read together" in out
    assert "Dropped 2 train example(s) with empty text or text pair" in out
    assert names == ["different", "same"] and data["train"].column_names == ["text", "text_pair", "label"]
    kept = {(r["Premise"], r["HYPOTHESIS"]) for i, r in enumerate(records) if i not in (3, 7)}
    assert {pair for split in data.values() for pair in zip(split["text"], split["text_pair"])} == kept
    # a named text column: a single text, no pair guessed; a named pair column: its text found by the pairs' names
    assert load(dataset=path, val_fraction=0, text_column="text")[0]["train"].column_names == ["text", "label"]
    named = load(dataset=path, val_fraction=0, text_pair_column="HYPOTHESIS")[0]["train"]
    assert sorted(zip(named["text"], named["text_pair"])) == sorted(zip(data["train"]["text"],
                                                                        data["train"]["text_pair"]))


def test_fingerprint_follows_every_pair(tmp_path):
    rows = agreement_pairs(60)
    changed = list(rows)
    changed[17] = (rows[17][0], rows[17][1] + " film", rows[17][2])
    prints = [fingerprint(*load(dataset=str(write_csv(tmp_path / f"{i}.csv", r, HEADER))))
              for i, r in enumerate((rows, rows, changed))]
    assert prints[0] == prints[1] != prints[2]  # a changed second text: resuming on it is refused


def test_pair_encoding_keeps_the_token_types_a_bert_tokenizer_makes(tmp_path, tiny_model):
    bert = tiny_bert(tmp_path / "bert")
    data = load(dataset=str(write_csv(tmp_path / "p.csv", agreement_pairs(40), HEADER)), val_fraction=0)[0]
    for folder, has_types in ((bert, True), (tiny_model, False)):  # BERT makes token types; DistilBERT does not
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokens = tokenize(data, tokenizer, 12)
        assert ("token_type_ids" in tokens["train"].column_names) is has_types
        first = tokens["train"][0]
        assert len(first["input_ids"]) == first["length"] <= 12  # longest_first: cut to max_len
        expected = tokenizer(data["train"][0]["text"], data["train"][0]["text_pair"], truncation="longest_first",
                             max_length=12)
        assert first["input_ids"] == expected["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(bert)
    batch = DataCollatorWithPadding(tokenizer)(list(tokenize(data, tokenizer, 32)["train"].remove_columns("length")
                                                    .select(range(4))))  # padded as the training loader pads
    assert batch["token_type_ids"].shape == batch["input_ids"].shape and batch["token_type_ids"].max() == 1


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line each

def test_bad_pair_data_is_refused_in_one_line(tmp_path):
    path = str(write_csv(tmp_path / "p.csv", agreement_pairs(40), HEADER))
    load_refused(r"^text pair column 'hypothesis' not found; the columns are: sentence1, sentence2, label$",
                 dataset=path, text_pair_column="hypothesis")
    load_refused("--text-pair-column 'sentence1' is the text column too", dataset=path, text_column="sentence1",
                 text_pair_column="sentence1")
    load_refused(r"--truncation head\+tail is for single long texts; a text pair is cut by the tokenizer",
                 dataset=path, truncation="head+tail")
    numbers = write_csv(tmp_path / "n.csv", [(a, i, label) for i, (a, _, label) in enumerate(agreement_pairs(40))],
                        HEADER)
    load_refused("the text pair column 'sentence2' holds numbers, not text; name the column of texts with "
                 "--text-pair-column", dataset=str(numbers))
    single = write_csv(tmp_path / "single.csv", [(a, label) for a, _, label in agreement_pairs(20, seed=2)])
    load_refused(r"^the training data holds text pairs, and a pair of text columns \(sentence1/sentence2, ", dataset=path,
                 test_file=str(single))
    first_only = write_csv(tmp_path / "first.csv", [(a, label) for a, _, label in agreement_pairs(20, seed=2)],
                           ("sentence1", "label"))  # its pair column is missing: named, not "no text column found"
    load_refused(r"^the training data holds text pairs, and the pair column 'sentence2' was not found; the columns "
                 "are: sentence1, label;", dataset=path, test_file=str(first_only))
    pairs_to_single = write_csv(tmp_path / "single-train.csv", [(a, label) for a, _, label in agreement_pairs(40)])
    load_refused("the test split holds text pairs and the training split single texts", dataset=str(pairs_to_single),
                 test_file=path)


def test_predict_refuses_what_a_pair_model_cannot_read(pair_run, encoder, tmp_path):
    import predict
    best = pair_run[1] / "best"
    refused(run_main(predict, best, "a great film", "bad\tplot"), "text argument 1: no tab; this model reads text "
                                                                   "pairs, each as first<TAB>second")
    refused(run_main(predict, best, stdin=b"good\tfun\nbad\tplot\tdull\n"), "standard input, line 2: 2 tabs")
    (tmp_path / "single.csv").write_text("text,label\na great film,same\n")
    refused(run_main(predict, best, "--file", tmp_path / "single.csv"), "this model reads text pairs, and a pair "
                                                                        "of text columns (sentence1/sentence2, ")
    (tmp_path / "first.csv").write_text("sentence1,label\na great film,same\n")
    refused(run_main(predict, best, "--file", tmp_path / "first.csv", "--text-column", "sentence1"),
            "this model reads text pairs, and the pair column 'sentence2' was not found; the columns are: sentence1, ")
    refused(run_main(predict, best, "--file", tmp_path / "single.csv", "--text-pair-column", "other"),
            "text pair column 'other' not found; the columns are: text, label")
    refused(run_main(predict, encoder, "--text-pair-column", "b", "a great film"),
            "--text-pair-column: this model reads single texts")
    (tmp_path / "pairs.csv").write_text("premise,hypothesis\na great film,a fine film\n")  # was: each text with itself
    refused(run_main(predict, best, "--file", tmp_path / "pairs.csv", "--text-pair-column", "premise"),
            "--text-pair-column 'premise' is the text column too; the pair is a second text column")
    with pytest.raises(UserError, match="this model reads text pairs: give \\(text, pair\\) tuples, not 'good'"):
        predict.predict(["good"], best)
    with pytest.raises(UserError, match="this model reads single texts, not \\(text, pair\\) tuples"):
        predict.predict([("good", "bad")], encoder)


# ---------------------------------------------------------------------------------------------------------------
# predict.py

def test_predict_on_a_table_gives_what_the_trained_model_gave(pair_run, pair_files):
    import predict
    metrics, out = pair_run
    code, stdout, _ = run_main(predict, out / "best", "--file", pair_files[1], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(stdout)))
    test = list(csv.reader(open(pair_files[1])))[1:]
    assert code == 0 and list(rows[0])[:4] == ["text", "text_pair", "label", "score"]
    assert [(r["text"], r["text_pair"]) for r in rows] == [(a, b) for a, b, _ in test]
    wrong = sorted((r["text"], r["text_pair"], label) for r, (*_, label) in zip(rows, test) if r["label"] != label)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert wrong == sorted((e["text"], e["text_pair"], e["label"]) for e in errors)  # the very same mistakes
    assert 1 - len(wrong) / len(test) == pytest.approx(metrics["test"]["accuracy"])
    # the first text's column named, as a user would: its partner found (not "no pair of columns", listing it)
    named = run_main(predict, out / "best", "--file", pair_files[1], "--format", "csv", "--text-column", "sentence1")
    assert named == (code, stdout, "")


def test_predict_on_tab_separated_lines_and_in_python(pair_run):
    import predict
    best = pair_run[1] / "best"
    pairs = [("a great film", "it was fun"), ("a great film", "the plot was dull"), ("", "")]
    code, stdout, _ = run_main(predict, best, *("\t".join(p) for p in pairs[:2]))
    rows = [json.loads(line) for line in stdout.splitlines()]
    code_stdin, stdin_out, _ = run_main(predict, best, stdin="".join("\t".join(p) + "\n" for p in pairs).encode())
    assert code == code_stdin == 0 and stdin_out.startswith(stdout)
    assert [list(r)[:3] for r in rows] == [["text", "text_pair", "label"]] * 2
    assert [(r["text"], r["text_pair"], r["label"]) for r in rows] == [(*pairs[0], "same"), (*pairs[1], "different")]
    in_python = predict.predict([list(p) for p in pairs[:2]], best)  # lists of two texts are taken too
    assert in_python == [json.loads(line) for line in stdout.splitlines()]
    # the same probabilities as the model itself gives for the tokenizer's pair encoding (calibrated by its T)
    model, tokenizer = predict.load_classifier(str(best))
    with torch.no_grad():
        logits = model(**tokenizer(*map(list, zip(*pairs[:2])), padding=True, return_tensors="pt")).logits
    probs = (logits.double() / predict.temperature(model)).softmax(-1)
    assert [r["probs"]["same"] for r in rows] == pytest.approx(probs[:, model.config.label2id["same"]].tolist(),
                                                               abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# BERT (token types): trained, predicted and exported with them

def tiny_bert(folder):
    """A 2-layer, 32-wide BERT with the toy vocabulary: unlike DistilBERT, it reads token_type_ids."""
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=64).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    return str(folder)


def test_a_bert_pair_model_predicts_and_exports_with_its_token_types(tmp_path):
    import export
    import predict
    data = write_csv(tmp_path / "p.csv", agreement_pairs(120), HEADER)
    train(resolve(model=tiny_bert(tmp_path / "bert"), dataset=str(data), output_dir=str(tmp_path / "run"),
                  audit=False, **{**RUN, "epochs": 1}))
    best = tmp_path / "run" / "best"
    model, tokenizer = predict.load_classifier(str(best))
    # token types now matter, and show in the logits (one epoch leaves the head's logits near 0.01 for any input);
    # not a constant added to the type embedding: the LayerNorm after the embeddings would take it off again
    model.bert.embeddings.token_type_embeddings.weight.data[1] += torch.linspace(-5, 5, model.config.hidden_size)
    model.classifier.weight.data *= 100
    pairs = [("a great film", "it was fun"), ("the plot was dull", "a great film")]
    encoded = tokenizer(*map(list, zip(*pairs)), padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**encoded).logits
        without_types = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    got = predict.predict_logits(pairs, tokenizer, predict.torch_forward(model))
    assert torch.allclose(got, expected, atol=1e-5) and (got - without_types).abs().max() > 0.01
    model.save_pretrained(best)  # what export.py loads: the model whose token types matter
    predict.load_classifier.cache_clear()
    export.main([str(best)])  # exits 1 if the ONNX model's logits differ from PyTorch's: token types fed to both
    report = json.loads((best / "onnx" / "report.json").read_text())
    assert report["onnx"]["max_abs_logit_diff"] <= 1e-4 and report["n"] == 24


# ---------------------------------------------------------------------------------------------------------------
# Two CPU processes

def test_two_processes_count_every_pair_once(encoder, tmp_path):
    train_csv = write_csv(tmp_path / "train.csv", agreement_pairs(200, seed=3), HEADER)
    # 41 test pairs, odd: the processes' shards differ
    test_csv = write_csv(tmp_path / "test.csv", agreement_pairs(39, seed=4) + contradictions(1, seed=7), HEADER)
    settings = dict(model=encoder, dataset=str(train_csv), test_file=str(test_csv), max_len=32, epochs=1, lr=3e-3,
                    precision="fp32", eval_batch_size=4, output_dir=str(tmp_path / "out"))
    torchrun("train.py", *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()))
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert recorded["num_processes"] == 2
    assert recorded["test"]["n"] == 41 == sum(map(sum, recorded["test"]["confusion_matrix"]))
    best = tmp_path / "out" / "best"
    cfg = resolve(**settings)
    tokenizer = AutoTokenizer.from_pretrained(best)
    data, names = load_data(cfg)
    loader = make_loaders(tokenize(data, tokenizer, cfg.max_len), tokenizer, cfg, "cpu")["test"]
    single = scores(*split_logits(AutoModelForSequenceClassification.from_pretrained(best), loader,
                                  Accelerator(cpu=True)), names)
    assert single["confusion_matrix"] == recorded["test"]["confusion_matrix"]
