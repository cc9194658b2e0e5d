"""The speed features change nothing they must not: length grouping, sorted evaluation, padding to multiples of 8;
precision chosen by the measured speed; --threads."""
import json
import random

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorWithPadding

from toy import toy_examples
import train as train_module
from config import UserError, parse_args, resolve
from data import TrainingBatches, make_loaders, tokenize
from train import choose_precision, cpu_bf16_speedup, evaluate, load_model, train


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


def matmul_timings(fp32, bf16, asked=None):
    """A stand-in for the probe's timing: seconds per row of the matmul in each precision; records the rows asked."""
    def seconds(dtype, rows):
        if asked is not None:
            asked.append(rows)
        return rows * (fp32 if dtype == torch.float32 else bf16)
    return seconds


@pytest.mark.parametrize("fp32, bf16, speedup, chosen", [
    (3.1, 1.0, 3.1, "bf16"),     # an AMD EPYC (Zen 4) or AMX: bf16 really faster
    (1.0, 1.5, 0.67, "fp32"),    # a Xeon with AVX512-BF16, no AMX: bf16 0.66x fp32
    (1.0, 0.9, 1.11, "fp32"),    # a little faster is not enough to pay for bf16's casts
])
def test_a_cpu_takes_bf16_only_where_it_is_measured_faster(fp32, bf16, speedup, chosen):
    measured = cpu_bf16_speedup(768, 4096, matmul_timings(fp32, bf16))
    assert measured == pytest.approx(speedup, abs=0.01)
    assert choose_precision("auto", None, measured) == chosen
    assert choose_precision("fp32", None, measured) == "fp32" and choose_precision("bf16", None, measured) == "bf16"
    assert choose_precision("auto", (7, 5), measured) == "fp16"  # the GPU rule, whatever the CPU
    assert choose_precision("auto", (8, 0), measured) == "bf16"


def test_emulated_bf16_is_not_timed_at_the_models_size():
    asked = []
    assert cpu_bf16_speedup(768, 4096, matmul_timings(1.0, 100.0, asked)) == pytest.approx(0.01)
    assert set(asked) == {16}  # the 16-token try told: no 4096-token bf16 matmul (seconds where bf16 is emulated)
    assert choose_precision("auto", None, 0.01) == "fp32"


def test_a_burst_of_load_during_the_bf16_timings_does_not_decide():
    # bf16 7x fp32 (an AMX Xeon), but another program starting on one of the 2 cores slows the first three
    # model-sized bf16 matmuls 20x: all that a best-of-3 of each precision in a row would have seen (it said 0.35x)
    asked = []

    def seconds(dtype, rows):
        asked.append((dtype, rows))
        if dtype == torch.float32:
            return rows * 1e-6
        burst = rows > 16 and asked.count((dtype, rows)) <= 3
        return rows * 1e-6 / 7 * (20 if burst else 1)
    measured = cpu_bf16_speedup(768, 4096, seconds)
    assert measured == pytest.approx(7) and choose_precision("auto", None, measured) == "bf16"


def test_the_real_probe_times_both_precisions():
    assert 0 < cpu_bf16_speedup(64, 256) < 1000  # its timing is for the run's Model line, not for a test


@pytest.mark.parametrize("speedup, chosen", [(0.66, "fp32"), (3.1, "bf16")])
def test_the_model_line_says_what_was_measured_and_chosen(speedup, chosen, fast, toy_csv, tmp_path, monkeypatch,
                                                          capsys):
    widths = []
    monkeypatch.setattr(train_module, "cpu_bf16_speedup", lambda hidden, tokens: widths.append(hidden) or speedup)
    metrics = train(resolve(**{**fast, "precision": "auto", "epochs": 1}, dataset=toy_csv, train_samples=64,
                            output_dir=str(tmp_path / "out")))
    assert f"· bf16 {speedup:.2g}× fp32 here: {chosen}, " in capsys.readouterr().out
    assert metrics["precision"] == chosen and widths == [32]  # measured on the model's width (the tiny one: 32)


def test_threads_1_trains_on_one_thread(fast, toy_csv, tmp_path, monkeypatch):
    seen, fit, before = [], train_module.fit, torch.get_num_threads()
    monkeypatch.setattr(train_module, "fit", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or
                        fit(*args, **kwargs))
    cfg = parse_args(["--model", fast["model"], "--dataset", toy_csv, "--max-len", "32", "--epochs", "1",
                      "--precision", "fp32", "--train-samples", "64", "--threads", "1",
                      "--output-dir", str(tmp_path / "out")])
    try:
        metrics = train(cfg)
    finally:
        torch.set_num_threads(before)  # the other tests run with every core
    assert seen == [1] and metrics["config"]["threads"] == 1


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_thread_counts_are_refused(value):
    with pytest.raises(UserError, match=f"--threads must be at least 1 \\(or none\\), not {value}"):
        parse_args([f"--threads={value}"])


def test_more_threads_than_cores_are_refused(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert parse_args(["--threads=2"]).threads == 2
    with pytest.raises(UserError, match="--threads 3 is more than this machine's 2 CPU cores"):
        parse_args(["--threads=3"])


def test_whole_run_times_the_seed_script_and_train_py(tiny_model, tmp_path):
    """bench.py --whole-run on the tiny model: both processes run to the end and are timed (no time asserted)."""
    from bench import whole_runs
    from toy import write_csv
    write_csv(tmp_path / "train.csv", toy_examples(40))
    write_csv(tmp_path / "seed_train.csv", toy_examples(36))
    write_csv(tmp_path / "test.csv", toy_examples(20, seed=1))
    run = whole_runs(tmp_path, tiny_model, pairs=1, max_len=32, epochs=1, threads=1)
    assert len(run["seconds"]["seed"]) == len(run["seconds"]["ours"]) == 1 and run["ratio"] > 0
    assert "test accuracy" in (tmp_path / "seed.log").read_text()
    assert run["model_line"].startswith("Model: ") and run["ours_precision"] in ("fp32", "bf16")
    assert json.loads((tmp_path / "ours" / "metrics.json").read_text())["config"]["threads"] == 1
