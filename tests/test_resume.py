"""Nothing lost: a killed or interrupted run resumes exactly; a crash mid-checkpoint keeps the previous one."""
import json
import re
import signal
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file

import train as train_module
from conftest import ROOT
from toy import toy_examples, write_csv
from config import UserError, resolve
from train import train


@pytest.fixture(scope="module")
def job(tiny_model_with_dropout, tmp_path_factory):
    """The flags of a small run with dropout (so the RNG state matters) and checkpoints every 3 steps, and the
    results of running it once, uninterrupted."""
    data = write_csv(tmp_path_factory.mktemp("resume") / "toy.csv", toy_examples(1000))
    flags = ["--model", tiny_model_with_dropout, "--dataset", str(data), "--max-len", "32", "--epochs", "3",
             "--lr", "3e-3", "--precision", "fp32", "--checkpoint-every", "3"]
    reference = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run([sys.executable, "train.py", *flags, "--output-dir", str(reference)], cwd=ROOT, check=True,
                   capture_output=True)
    return flags, reference


def start(flags, out, *extra):
    return subprocess.Popen([sys.executable, "train.py", *flags, "--output-dir", str(out), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_bar(process, pattern):
    """Read the progress bars on stderr (blocking reads, no sleeping) until `pattern` shows."""
    seen = b""
    while not re.search(pattern, seen):
        chunk = process.stderr.read1(4096)
        assert chunk, f"the run ended before {pattern!r} showed: {seen[-500:]!r}"
        seen += chunk


def resume(flags, out):
    run = subprocess.run([sys.executable, "train.py", *flags, "--output-dir", str(out), "--resume"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def assert_same_run(out, reference):
    metrics, expected = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["test"] == expected["test"] and metrics["val"] == expected["val"]
    assert metrics["best_epoch"] == expected["best_epoch"]
    weights, expected_weights = (load_file(d / "best" / "model.safetensors") for d in (out, reference))
    assert all(torch.equal(weights[k], expected_weights[k]) for k in expected_weights)
    log, expected_log = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
                          for line in (d / "log.jsonl").read_text().splitlines()] for d in (out, reference))
    assert log == expected_log


def test_sigkill_mid_epoch_then_resume_is_exact(job, tmp_path):
    flags, reference = job
    process = start(flags, tmp_path / "out")
    wait_for_bar(process, rb"epoch 2:\s+\d+%")  # 45 steps an epoch: a checkpoint every 3 steps is behind us
    process.kill()  # SIGKILL: no handler runs, the run just stops wherever it is
    process.wait()
    step = int(re.search(r"Resuming .* at epoch 2, step (\d+)", resume(flags, tmp_path / "out")).group(1))
    assert 45 <= step < 90  # it resumed inside epoch 2, not from the start
    assert_same_run(tmp_path / "out", reference)


def test_sigint_saves_a_checkpoint_and_exits_130(job, tmp_path):
    flags, reference = job
    process = start(flags, tmp_path / "out")
    wait_for_bar(process, rb"epoch 1:[^\r\n]*\| *(?:[4-9]|[1-4]\d)/45")  # step 4 or later: checkpoint 3 is on disk
    process.send_signal(signal.SIGINT)  # (at 0%, before any checkpoint, the run rightly has nothing to resume)
    stdout, _ = process.communicate()
    assert process.returncode == 130
    assert re.search(rb"Interrupted: checkpoint saved at step \d+\. Resume with the same flags plus: "
                     rb"--output-dir \S+ --resume", stdout)
    assert not (tmp_path / "out" / "metrics.json").exists()
    resume(flags, tmp_path / "out")
    assert_same_run(tmp_path / "out", reference)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_with_dropout, toy_csv, tmp_path,
                                                                crash_at_checkpoint):
    settings = dict(model=tiny_model_with_dropout, dataset=toy_csv, max_len=32, epochs=3, lr=3e-3,
                    precision="fp32", checkpoint_every=0)  # checkpoints at epoch ends only
    expected = train(resolve(output_dir=str(tmp_path / "reference"), **settings))
    # epoch 2's checkpoint: half written, then the machine dies
    crash_at_checkpoint(2, lambda: train(resolve(output_dir=str(tmp_path / "out"), **settings)), half_written=True)
    assert json.loads((tmp_path / "out" / "checkpoint" / "state.json").read_text())["epoch"] == 2
    resumed = train(resolve(output_dir=str(tmp_path / "out"), resume=True, **settings))
    assert resumed["test"] == expected["test"] and resumed["val"] == expected["val"]


def test_resume_refuses_changed_settings_but_allows_more_epochs(tiny_model, toy_csv, tmp_path):
    settings = dict(model=tiny_model, dataset=toy_csv, max_len=32, lr=3e-3, precision="fp32",
                    output_dir=str(tmp_path / "out"))
    train(resolve(epochs=1, keep_checkpoint=True, **settings))
    with pytest.raises(UserError, match=r"cannot resume .* \(--lr 0\.003 -> 0\.01\)"):
        train(resolve(epochs=2, resume=True, **{**settings, "lr": 1e-2}))
    metrics = train(resolve(epochs=2, resume=True, **settings))
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 2 and metrics["best_epoch"] in (1, 2)
    record = (tmp_path / "out" / "metrics.json").read_text()
    with pytest.raises(UserError, match=r"has trained 2 epochs, more than --epochs 1: a resumed run can go on"):
        train(resolve(epochs=1, resume=True, **settings))  # the record said "best epoch 2 of 1"
    assert (tmp_path / "out" / "metrics.json").read_text() == record


def test_a_finished_run_keeps_of_its_checkpoint_only_the_state_unless_told(tiny_model, toy_csv, tmp_path, capsys):
    settings = dict(model=tiny_model, dataset=toy_csv, max_len=32, lr=3e-3, precision="fp32", epochs=1)
    out, kept = tmp_path / "out", tmp_path / "kept"
    first = train(resolve(output_dir=str(out), **settings))
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.json"]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 18
    with pytest.raises(UserError, match=rf"^{out} finished, and a finished run keeps only checkpoint/state.json, "
                                        r"not the weights .* --epochs 2 .*--keep-checkpoint"):
        train(resolve(output_dir=str(out), resume=True, **{**settings, "epochs": 2}))
    again = train(resolve(output_dir=str(out), resume=True, **settings))  # nothing left to train: tested again
    assert again["test"] == first["test"] and "has trained its epochs" in capsys.readouterr().out
    train(resolve(output_dir=str(kept), keep_checkpoint=True, **settings))
    whole = sum(f.stat().st_size for f in (kept / "checkpoint").iterdir())
    assert whole > 2 * (kept / "best" / "model.safetensors").stat().st_size  # weights, optimizer's two moments
    assert train(resolve(output_dir=str(kept), resume=True, **{**settings, "epochs": 2}))["best_epoch"] in (1, 2)


def test_resume_needs_an_output_dir():
    with pytest.raises(UserError, match="--resume needs --output-dir"):
        resolve(resume=True)


def test_nan_loss_stops_with_the_step(tiny_model, toy_csv, tmp_path):
    with pytest.raises(UserError, match=r"the training loss became nan at step \d+: lower --lr"):
        train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, lr=1e4, max_grad_norm=0, precision="fp32",
                      output_dir=str(tmp_path / "out")))


def test_out_of_memory_names_the_knobs(tiny_model, toy_csv, tmp_path, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train_module, "fit", out_of_memory)
    with pytest.raises(UserError, match="out of GPU memory at --batch-size 16 and --max-len 32: lower --batch-size"):
        train(resolve(model=tiny_model, dataset=toy_csv, max_len=32, output_dir=str(tmp_path / "out")))


def test_unreachable_hub_is_reported_at_once(toy_csv, tmp_path, monkeypatch):
    """No network: one short probe, then offline mode, so a model that is not cached fails now, not after retries."""
    import datasets
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(UserError, match="the Hub cannot be reached .offline. and it is not in the local cache"):
        train(resolve(model="nobody/no-such-model-here", dataset=toy_csv, output_dir=str(tmp_path / "out")))
