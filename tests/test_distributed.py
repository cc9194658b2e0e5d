"""Two CPU processes (torchrun, gloo): every evaluated example counts once, and only one process writes."""
import json
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import ROOT
from toy import toy_examples, unsure_pairs, write_csv
from config import resolve
from data import load_data, make_loaders, tokenize
from analysis import scores
from train import split_logits


def torchrun(*args):
    """Two processes of `args` (a script and its flags); train.py without its step floor, as in-process tests run
    it (conftest), so that their results compare."""
    args = (*args[:1], "--min-steps=0", *args[1:]) if args[:1] == ("train.py",) else args
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args], cwd=ROOT, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    train_csv = write_csv(folder / "train.csv", toy_examples(300, seed=1))
    # 41, odd: the processes' shards differ; two pairs of texts with both labels: two mistakes at least
    test_csv = write_csv(folder / "test.csv", toy_examples(37, seed=2) + unsure_pairs(2))
    settings = dict(model=tiny_model, dataset=str(train_csv), test_file=str(test_csv), max_len=32, epochs=2,
                    lr=3e-3, precision="fp32", eval_batch_size=4, output_dir=str(folder / "out"))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    return settings, torchrun("train.py", *flags)


def test_each_test_example_counts_once_and_one_process_writes(two_process_run):
    settings, stdout = two_process_run
    out = settings["output_dir"]
    metrics = json.loads(open(f"{out}/metrics.json").read())
    assert metrics["num_processes"] == 2 and metrics["global_batch_size"] == 32
    assert metrics["test"]["n"] == 41 == sum(map(sum, metrics["test"]["confusion_matrix"]))
    written = sorted(name for name in os.listdir(out) if name != ".lock")  # .lock stays: only its lock goes
    assert written == ["best", "calibration.png", "checkpoint", "confusion.png", "curves.png", "errors.jsonl",
                       "log.jsonl", "metrics.json", "suspect_labels.jsonl"]
    assert len(open(f"{out}/log.jsonl").read().splitlines()) == 2
    assert stdout.count("Model: ") == 1 and stdout.count("· n=41 (best epoch") == 1  # the main process talks
    assert "batch 16 × 2 × grad_accum 1 = 32" in stdout


def test_two_process_metrics_equal_a_single_process_evaluation(two_process_run):
    settings, _ = two_process_run
    best = os.path.join(settings["output_dir"], "best")
    cfg = resolve(**settings)
    tokenizer = AutoTokenizer.from_pretrained(best)
    data = tokenize(load_data(cfg)[0], tokenizer, cfg.max_len)
    model = AutoModelForSequenceClassification.from_pretrained(best)
    logits, labels = split_logits(model, make_loaders(data, tokenizer, cfg, "cpu")["test"], Accelerator(cpu=True))
    single = scores(logits, labels, ["neg", "pos"])
    recorded = json.loads(open(os.path.join(settings["output_dir"], "metrics.json")).read())["test"]
    assert single["confusion_matrix"] == recorded["confusion_matrix"]
    assert single["accuracy"] == pytest.approx(recorded["accuracy"]) and single["n"] == 41
    # the shards interleave, yet each mistake is written with its own text and label (the batches carry `idx`)
    texts = load_data(cfg)[0]["test"]["text"]
    wrong = sorted((texts[i], ["neg", "pos"][labels[i]]) for i in range(41) if logits[i].argmax() != labels[i])
    errors = [json.loads(line) for line in open(os.path.join(settings["output_dir"], "errors.jsonl"))]
    assert sorted((e["text"], e["label"]) for e in errors) == wrong and len(wrong) >= 2


def test_each_example_is_trained_on_exactly_once_per_epoch():
    """41 examples in micro-batches of 4 make 11 batches; for 2 processes the largest is halved (12), so each process
    takes 6 batches and no example is repeated to fill the last round. The order changes between epochs."""
    epochs = [json.loads(line) for line in torchrun("tests/epoch_order.py", "41", "4").splitlines()
              if line.startswith("{")]
    for epoch in epochs:
        assert sorted(epoch["seen"]) == list(range(41)) and epoch["batches"] == 6
    assert epochs[0]["seen"] != epochs[1]["seen"]


def test_accelerate_launch_of_several_processes_that_starts_one_says_so(tmp_path):
    """accelerate launch --num_processes 2 without --multi_gpu starts ONE process on a machine without GPUs, which
    then runs as asked for one: the line says so and how to get two; with --multi_gpu there are two, and no line."""
    script = tmp_path / "launched.py"
    script.write_text("import os\nfrom runs import say_if_launched_as_one\nsay_if_launched_as_one()\n"
                      "print('process', os.environ.get('RANK', '0'))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(*flags):
        run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *flags, str(script)], cwd=ROOT,
                             capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout
    one = launch("--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no")
    assert one.count("process ") == 1
    assert "Warning: accelerate launch was asked for several processes and started one; on CPUs run accelerate " \
           "launch --multi_gpu --num_processes N" in one
    two = launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no")
    assert sorted(line for line in two.splitlines() if line.startswith("process")) == ["process 0", "process 1"]
    assert "Warning" not in two
