"""The speed features change nothing they must not: length grouping, sorted evaluation, padding to multiples of 8."""
import random

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from toy import toy_examples
from config import resolve
from data import TrainingBatches, make_loaders, tokenize
from train import evaluate, load_model


def padding_share(batches, lengths):
    return 1 - sum(lengths[i] for b in batches for i in b) / sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_sees_every_example_once_per_epoch_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(1000)]
    sampler = TrainingBatches(lengths, batch_size=16, seed=42)
    epochs = []
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(1000))  # each example exactly once
        assert len(batches) == len(sampler) == 63 and [len(b) for b in batches[:-1]] == [16] * 62
        assert len(batches[-1]) == 1000 % 16  # the partial batch comes last
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # a new order every epoch
    sampler.set_epoch(1)
    assert list(sampler) == epochs[0]  # ... that the seed and epoch decide (what an exact resume needs)
    shuffled = list(range(1000))
    rng.shuffle(shuffled)
    random_batches = [shuffled[i:i + 16] for i in range(0, 1000, 16)]
    assert padding_share(epochs[0], lengths) < 0.1 < 0.4 < padding_share(random_batches, lengths)


@pytest.fixture
def toy_split(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = toy_examples(90)
    data = Dataset.from_dict({"text": [t for t, _ in rows], "label": [int(lab == "pos") for _, lab in rows]})
    return tokenize({"test": data}["test"], tokenizer, 32), tokenizer


def test_sorted_evaluation_gives_the_same_predictions(tiny_model, toy_split):
    data, tokenizer = toy_split
    torch.manual_seed(0)
    model = load_model(resolve(model=tiny_model), ["neg", "pos"])
    cfg = resolve(model=tiny_model, eval_batch_size=8)
    sorted_loader = make_loaders({"train": data, "test": data}, tokenizer, cfg, "cpu")["test"]
    plain_loader = DataLoader(data.remove_columns("length"), batch_size=8, collate_fn=DataCollatorWithPadding(tokenizer))
    assert [len(b["input_ids"][0]) for b in sorted_loader] != [len(b["input_ids"][0]) for b in plain_loader]
    accelerator = Accelerator(cpu=True)
    by_length, as_given = (evaluate(model, loader, accelerator, ["neg", "pos"]) for loader in (sorted_loader,
                                                                                                plain_loader))
    assert by_length["confusion_matrix"] == as_given["confusion_matrix"] and by_length["n"] == 90
    assert by_length["loss"] == pytest.approx(as_given["loss"], abs=1e-6)


def test_padding_to_a_multiple_of_8_changes_no_loss(tiny_model, toy_split):
    data, tokenizer = toy_split
    model = load_model(resolve(model=tiny_model), ["neg", "pos"]).eval()
    features = [data[i] for i in range(16)]
    for f in features:
        f.pop("length")
    losses, widths = [], []
    for multiple in (None, 8):
        batch = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple)(features)
        widths.append(batch["input_ids"].shape[1])
        with torch.no_grad():
            losses.append(float(model(**batch).loss))
    assert widths[0] % 8 != 0 and widths[1] % 8 == 0 and widths[1] > widths[0]  # really padded further
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def test_bench_runs_all_three_and_writes_json(tiny_model, toy_csv, tmp_path):
    """A smoke run of bench.py on the tiny model (the timings themselves are for the README, not for tests)."""
    import json

    from bench import main
    main(["--model", tiny_model, "--dataset", toy_csv, "--train-samples", "32", "--eval-samples", "32",
          "--max-len", "32", "--json", str(tmp_path / "bench.json")])
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report["results"]) == ["tutorial", "trainer", "ours"]
    for row in report["results"].values():
        assert row["train_examples_per_s"] > 0 and row["eval_examples_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert 0 < row["mfu"] < 1 and 0 <= row["accuracy"] <= 1
    tutorial, ours = report["results"]["tutorial"], report["results"]["ours"]
    padding = {name: row["padded_tokens_per_s"] / row["real_tokens_per_s"] for name, row in
               (("tutorial", tutorial), ("ours", ours))}
    assert padding["tutorial"] > 1.5 and padding["ours"] < padding["tutorial"]  # toy texts: 6-22 tokens of 32


def test_compiled_training_saves_a_plain_model(tiny_model, toy_csv, tmp_path):
    """--compile (torch.compile through accelerate): trains, and best/ holds ordinary weights a pipeline loads."""
    import json

    from transformers import pipeline

    from train import train
    metrics = train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, epochs=1, lr=3e-3, precision="fp32",
                            compile=True, output_dir=str(tmp_path / "out")))
    assert metrics["test"]["n"] == 80
    (epoch,) = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert epoch["positions"] == 288 * 32  # toy texts (6-22 tokens) padded to the bucket of 32 = max_len, no more
    classify = pipeline("text-classification", model=str(tmp_path / "out" / "best"), device="cpu")
    assert classify("a great film")[0]["label"] in ("neg", "pos")


@pytest.mark.parametrize("group_by_length", [True, False])
def test_batches_for_several_processes_hold_every_example_once(group_by_length):
    """1,000 examples in batches of 16 make 63 batches; for 4 processes the largest are halved up to 64, so each
    process gets 16 and no example is repeated to even out the last round."""
    sampler = TrainingBatches(list(range(1000)), batch_size=16, seed=0, group_by_length=group_by_length, processes=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 64 and all(batches)
    assert sorted(i for b in batches for i in b) == list(range(1000))
