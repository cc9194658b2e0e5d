"""The output folder under stress: a lock, --overwrite that keeps the earlier run until the new one has a result,
best/ loadable at every instant, runs killed early, damaged checkpoints, resume on changed data, stop signals at
any phase, a full disk."""
import errno
import fcntl
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import subprocess
import sys

import pytest
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import runs
import train as train_module
from conftest import ROOT
from config import UserError, resolve
from toy import toy_examples, write_csv
from train import train


@pytest.fixture
def quick(fast, toy_csv):
    return {**fast, "dataset": toy_csv, "epochs": 1}


def test_a_second_run_on_a_locked_folder_is_refused(quick, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "a+") as holder:  # another run holds the folder
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 4242 on somehost since 2026-11-24 01:00:00\n")
        holder.flush()
        with pytest.raises(UserError, match=r"in use by another run \(pid 4242 on somehost"):
            train(resolve(**quick, output_dir=str(out)))
    assert train(resolve(**quick, output_dir=str(out)))["test"]["n"] == 80  # the lock goes with its holder


def contend(settings, start, holding, refused, stderr):
    """One of two runs started at once on one folder (a forked process). The one that gets the lock stops there, as
    if loading its data (its folder holds only .lock), until the other has been refused; then it exits with 0 if its
    lock is still its own and in place, else 3. The other goes through train.py's main (exit code 2)."""
    sys.stderr = open(stderr, "w")
    check_output_dir = train_module.check_output_dir

    def holding_the_lock(out, cfg):
        check_output_dir(out, cfg)
        holding.set()
        refused.wait(30)
        lock = out / ".lock"
        raise SystemExit(0 if lock.is_file() and lock.read_text().startswith(f"pid {os.getpid()} ") else 3)
    train_module.check_output_dir = holding_the_lock
    start.wait()
    train_module.main(resolve(**settings))


def test_of_two_runs_started_at_once_on_one_folder_the_refused_one_touches_nothing(quick, tmp_path):
    context = multiprocessing.get_context("fork")  # cheap: no imports again
    for attempt in range(20):
        out = tmp_path / f"out{attempt}"
        start, holding, refused = context.Barrier(2), context.Event(), context.Event()
        contenders = [context.Process(target=contend, args=({**quick, "output_dir": str(out)}, start, holding, refused,
                                                       tmp_path / f"stderr{attempt}-{i}")) for i in range(2)]
        for run in contenders:
            run.start()
        assert holding.wait(30), "no run got the lock"
        first_to_end = multiprocessing.connection.wait([run.sentinel for run in contenders], timeout=30)
        assert len(first_to_end) == 1, "both runs ended, or none, while one held the lock"
        loser = next(i for i, run in enumerate(contenders) if run.sentinel in first_to_end)
        refused.set()
        for run in contenders:
            run.join(30)
        assert contenders[loser].exitcode == 2 and contenders[1 - loser].exitcode == 0  # 3: the winner's lock touched
        assert re.fullmatch(r"error: \S+ is in use by another run \((pid \d+ on \S+ since [\d: -]+|another process)\); "
                            r"wait for it to end or choose another --output-dir\n",
                            (tmp_path / f"stderr{attempt}-{loser}").read_text())
        assert not out.exists()  # the winner wrote nothing: its own clean-up removed the folder


def test_a_lock_taken_as_its_holder_removed_it_is_taken_again(tmp_path, monkeypatch):
    """A run that opened out/.lock just before its holder (refused before it wrote anything) removed the file and the
    folder, and then got the lock of the removed file: it locks a new out/.lock, which a third run finds locked."""
    out = tmp_path / "out"
    out.mkdir()
    flock = fcntl.flock

    def holder_leaves_first(handle, operation):
        monkeypatch.setattr(runs.fcntl, "flock", flock)
        (out / ".lock").unlink()
        out.rmdir()
        flock(handle, operation)
    monkeypatch.setattr(runs.fcntl, "flock", holder_leaves_first)
    with runs.locked(out):
        with open(out / ".lock") as third, pytest.raises(BlockingIOError):
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_default_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runs.time, "strftime", lambda *args: "20261124-010000")
    first, second = (runs.choose_output_dir(resolve()) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()


def test_output_dir_that_is_a_file_is_refused_before_anything_loads(quick, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train(resolve(**{**quick, "model": "no/such-model"}, output_dir=str(tmp_path / "file")))
    assert (tmp_path / "file").read_text() == "mine"


def test_output_dir_overlapping_the_model_folder_is_refused_before_anything_is_written(quick, tmp_path):
    """--output-dir = --model (or one inside the other): the run wrote into the base model's folder, whose hash every
    run trained from it resumes by; refused before even the lock file goes in."""
    import shutil
    model = shutil.copytree(quick["model"], tmp_path / "model")
    files = sorted(p.name for p in model.rglob("*"))
    for out in (model, model / "run", tmp_path):
        with pytest.raises(UserError, match=r"--output-dir .* and --model .* overlap"):
            train(resolve(**{**quick, "model": str(model)}, output_dir=str(out), overwrite=True))
    assert sorted(p.name for p in model.rglob("*")) == files


def test_output_dir_inside_a_dataset_folder_is_refused(quick, tmp_path):
    """A folder of class folders: the run's own folder was then refused as 'a class folder without .txt files'."""
    for name, label in (("pos", "great fun"), ("neg", "awful bore")):
        (tmp_path / "news" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "news" / name / f"{i}.txt").write_text(f"{label} {i}")
    with pytest.raises(UserError, match=r"--output-dir .*run is inside the --dataset folder .*news: the run's folder"):
        train(resolve(**{**quick, "dataset": str(tmp_path / "news")}, output_dir=str(tmp_path / "news" / "run")))
    assert not (tmp_path / "news" / "run").exists()


def test_overwrite_that_fails_restores_the_earlier_run(quick, tmp_path):
    out = tmp_path / "out"
    train(resolve(**quick, output_dir=str(out)))
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "log.jsonl", "best/model.safetensors")}
    (out / "tensorboard").mkdir()  # the user's own, from another tool: this run does not write one
    (out / "tensorboard" / "events").write_text("theirs")
    with pytest.raises(UserError, match=r"loss became nan at step \d+.*the earlier run in .* is restored as it was"):
        train(resolve(**{**quick, "lr": 1e4}, max_grad_norm=0, output_dir=str(out), overwrite=True))
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / ".replaced").exists() and (out / "tensorboard" / "events").read_text() == "theirs"
    metrics = train(resolve(**quick, seed=7, output_dir=str(out), overwrite=True))  # a good one replaces it
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7 == metrics["config"]["seed"]
    assert not (out / ".replaced").exists() and (out / "tensorboard" / "events").read_text() == "theirs"


def test_nan_without_a_checkpoint_does_not_claim_one(quick, tmp_path):
    nan = {**quick, "lr": 1e4, "max_grad_norm": 0}
    with pytest.raises(UserError, match=r"loss became nan at step \d+: .*; no checkpoint was written yet$"):
        train(resolve(**nan, output_dir=str(tmp_path / "a")))
    with pytest.raises(UserError, match=r"loss became nan at step \d+: .*; the checkpoint at step \d+ is kept"):
        train(resolve(**nan, checkpoint_every=1, output_dir=str(tmp_path / "b")))
    assert list((tmp_path / "b" / "checkpoint").glob("model*.safetensors"))  # a failed run too


def test_a_run_killed_before_its_first_checkpoint_is_not_protected(quick, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"kind": "step", "step": 10}\n')  # all a run killed at step 12 leaves
    assert train(resolve(**quick, output_dir=str(out), resume=True))["best_epoch"] == 1  # from the beginning
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "epoch" and rows[0]["step"] == 18  # the stale row is gone
    (out / "checkpoint").rename(tmp_path / "gone")
    (out / "metrics.json").unlink()
    (out / "log.jsonl").write_text("")
    assert train(resolve(**quick, output_dir=str(tmp_path / "other")))  # and without --resume:
    with pytest.raises(UserError, match="already holds a run"):  # best/ is still a run's result
        train(resolve(**quick, output_dir=str(out)))


def test_best_is_loadable_at_every_instant_of_a_save(quick, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(resolve(**quick, output_dir=str(out)))
    model = AutoModelForSequenceClassification.from_pretrained(out / "best")
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    old_weights = (out / "best" / "model.safetensors").read_bytes()
    replace = os.replace

    def killed_at_the_weights(src, dst):
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt  # a kill between two files of the swap
        replace(src, dst)
    monkeypatch.setattr(runs.os, "replace", killed_at_the_weights)
    with pytest.raises(KeyboardInterrupt):
        model.classifier.bias.data += 1
        runs.save_model(model, tokenizer, out / "best", Accelerator(cpu=True))
    assert (out / "best" / "model.safetensors").read_bytes() == old_weights
    AutoModelForSequenceClassification.from_pretrained(out / "best")  # whole and loadable


def test_damaged_checkpoint_is_one_line(quick, tmp_path):
    out = tmp_path / "out"
    train(resolve(**quick, output_dir=str(out), keep_checkpoint=True))
    weights = next((out / "checkpoint").glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="the checkpoint in .* is damaged"):
        train(resolve(**{**quick, "epochs": 2}, output_dir=str(out), resume=True))
    state = (out / "checkpoint" / "state.json").read_text()
    (out / "checkpoint" / "state.json").write_text('{"step": ')
    with pytest.raises(UserError, match=r"the checkpoint in .* is damaged \(JSONDecodeError"):
        train(resolve(**{**quick, "epochs": 2}, output_dir=str(out), resume=True))
    config = json.loads(state)["config"]  # JSON that parses, but not a run's state: was a traceback
    for shape, said in (([], "not a JSON object"), ({"config": 5}, "not a JSON object"),
                        ({"config": config, "epoch": "x"}, "\"epoch\" holds 'x'"),
                        ({"config": config, "log": {}}, "\"log\" holds {}")):
        (out / "checkpoint" / "state.json").write_text(json.dumps(shape))
        with pytest.raises(UserError, match=rf"the checkpoint in .* is damaged \(TypeError: {said}"):
            train(resolve(**{**quick, "epochs": 2}, output_dir=str(out), resume=True))


def test_resume_on_changed_data_is_refused(quick, tmp_path):
    data = write_csv(tmp_path / "data.csv", toy_examples(400))
    out = tmp_path / "out"
    train(resolve(**{**quick, "dataset": str(data)}, output_dir=str(out), keep_checkpoint=True))
    rows = toy_examples(400)
    rows[0] = (rows[0][0], "pos" if rows[0][1] == "neg" else "neg")  # one label changed
    write_csv(data, rows)
    with pytest.raises(UserError, match="cannot resume .*: the data changed since its checkpoint"):
        train(resolve(**{**quick, "dataset": str(data), "epochs": 2}, output_dir=str(out), resume=True))


def signal_during(monkeypatch, name):
    """SIGTERM to this process when train.py calls `name` (once), as if it came in that phase."""
    real = getattr(train_module, name)

    def with_signal(*args, **kwargs):
        monkeypatch.setattr(train_module, name, real)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, name, with_signal)


@pytest.mark.parametrize("phase, settings, kept", [
    ("load_data", {}, "Interrupted before the first checkpoint"),
    ("split_logits", {}, "Interrupted before the first checkpoint"),  # the first validation
    ("split_logits", {"val_fraction": 0}, r"Interrupted: checkpoint saved at step 20\. Resume"),  # the test split
])
def test_sigterm_outside_the_steps_stops_the_run(quick, tmp_path, monkeypatch, capsys, phase, settings, kept):
    signal_during(monkeypatch, phase)
    with pytest.raises(KeyboardInterrupt):  # main() turns it into exit code 130
        train(resolve(**quick, **settings, output_dir=str(tmp_path / "out")))
    assert any(line.startswith("Interrupted") for line in capsys.readouterr().out.splitlines())
    assert re.search(kept, runs.what_is_kept(tmp_path / "out", resolve(**quick)))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored for the notebook


def test_an_interrupted_overwrite_says_how_to_resume_it(quick, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    train(resolve(**quick, output_dir=str(out)))
    earlier = (out / "metrics.json").read_text()
    signal_during(monkeypatch, "split_logits")  # the test split, after the checkpoint of the only epoch
    again = {**quick, "val_fraction": 0, "seed": 7, "output_dir": str(out)}
    with pytest.raises(KeyboardInterrupt):
        train(resolve(**again, overwrite=True))
    # the only epoch trained: its checkpoint is state.json alone (no weights: a finished run would drop them), and
    # --resume evaluates best/ again, as the line says
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.json"]
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"Interrupted: checkpoint saved at step 20. Resume with the same flags without --overwrite "
                           f"plus: --output-dir {out} --resume. The earlier run's outputs wait in {out / '.replaced'}")
    assert json.loads((out / ".replaced" / "metrics.json").read_text()) == json.loads(earlier)
    metrics = train(resolve(**again, resume=True))  # what the line says: the same flags, --overwrite left out
    assert metrics["config"]["seed"] == 7 and not (out / ".replaced").exists()


HELD_AT_ITS_IMPORTS = """
import runpy, sys
class Held:  # the first import of datasets (train.py's first heavy import) says so, then waits for the signal
    def find_spec(self, name, path=None, target=None):
        if name == "datasets":
            sys.meta_path.remove(self)
            print("importing datasets", flush=True)
            sys.stdin.readline()
sys.meta_path.insert(0, Held())
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_the_imports_is_one_line_and_exit_130(quick, tmp_path, signum):
    """python train.py, stopped inside its imports (they take seconds): no traceback, no silent exit 143."""
    flags = ["--model", quick["model"], "--dataset", quick["dataset"], "--output-dir", str(tmp_path / "out")]
    process = subprocess.Popen([sys.executable, "-c", HELD_AT_ITS_IMPORTS, *flags], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "importing datasets\n"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stdout.strip(), stderr) == (130, "Interrupted before the run started: nothing written",
                                                            "")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line(quick, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_module, "save_checkpoint", full)
    with pytest.raises(UserError, match="no space left on the device while writing to .*; no checkpoint was written"):
        train(resolve(**quick, output_dir=str(tmp_path / "out")))


def test_default_folder_is_named_after_the_preset_or_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runs.choose_output_dir(resolve()).name.startswith("imdb-")  # the preset's own data
    assert runs.choose_output_dir(resolve(dataset="my reviews.csv")).name.startswith("my_reviews-")
    assert runs.choose_output_dir(resolve("ag_news", dataset="news/")).name.startswith("news-")
