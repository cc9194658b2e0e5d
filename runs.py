"""The output folder of a run: choosing it, writing into it so that nothing is ever left half-written and an
earlier run is never overwritten by accident, checkpoints and what --resume checks before it continues, and the
signals that stop a run cleanly. Also `say`: what a run prints, from the main process only."""
import copy
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from peft import PeftModel

from config import UserError, of_kind, resolve

OUTPUTS = ("best", "metrics.json", "log.jsonl", "checkpoint", "curves.png", "confusion.png", "lengths.png",
           "tensorboard", "errors.jsonl", "suspect_labels.jsonl", "calibration.png", "per_label.png")  # what a run writes


def say(*args, **kwargs):
    """print, on the main process only: under several processes each would say the same thing."""
    PartialState().print(*args, **kwargs)



# ----------------------------------------------------------------------------------------------------------------
# Output folder: nothing is left half-written, and an earlier run is never overwritten by accident

def say_if_launched_as_one():
    """`accelerate launch --num_processes N` without --multi_gpu starts ONE process where there are no GPUs
    (accelerate 1.x's simple launcher: it sets MASTER_ADDR, as for N processes, but no WORLD_SIZE). Say so."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        say("Warning: accelerate launch was asked for several processes and started one; on CPUs run "
            "accelerate launch --multi_gpu --num_processes N train.py ... (or torchrun --nproc_per_node N train.py ...)")


def choose_output_dir(cfg):
    """A new runs/<name>-<time> folder unless given (created at once, so two runs started in the same second
    get two folders); a given folder must be a folder we can write to."""
    if cfg.output_dir is None:
        out = None
        if PartialState().is_main_process:
            base = Path("runs") / f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
            for n in range(1, 1000):
                out = base if n == 1 else base.with_name(f"{base.name}-{n}")
                try:
                    out.mkdir(parents=True)
                    break
                except FileExistsError:
                    continue
        return Path(broadcast_object_list([str(out)])[0])  # every process must agree on the folder
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: they all check at once
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {out}: {e.strerror or e}") from None
    return out


def run_name(cfg):
    """The preset's name for the preset's own data; else the data's (a run on reviews.csv is no imdb run)."""
    if cfg.dataset == resolve(cfg.preset).dataset:
        return cfg.preset
    return re.sub(r"[^\w.-]+", "_", Path(cfg.dataset.rstrip("/")).stem) or cfg.preset


@contextmanager
def locked(out):
    """An OS lock on out/.lock while this run uses the folder (released on any exit, a kill too): a second run on
    the same folder is refused, naming the holder, and touches nothing. The main process holds it for all processes
    of a run."""
    if not PartialState().is_main_process:
        yield
        return
    handle = lock_file(out)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        yield
    finally:
        if [p.name for p in out.iterdir()] == [".lock"]:  # refused before it wrote anything: no litter, removed
            (out / ".lock").unlink()  # while the lock is held, so no other run is using this folder
            with suppress(OSError):  # not empty: another run has just come to it
                out.rmdir()
        handle.close()  # releases the lock


def lock_file(out):
    """out/.lock, open and locked by this process; a UserError when another run holds it. Only the holder removes
    the file (locked: a run refused before writing anything): a lock taken on the file it removed guards nothing, so
    then the lock is taken again, on a new out/.lock."""
    while True:
        out.mkdir(parents=True, exist_ok=True)  # the holder may have removed the folder too
        try:
            handle = open(out / ".lock", "a+")
        except FileNotFoundError:  # ... just now
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{out} is in use by another run ({holder}); wait for it to end or choose another "
                            "--output-dir") from None
        with suppress(FileNotFoundError):
            if os.path.samestat(os.stat(out / ".lock"), os.fstat(handle.fileno())):
                return handle
        handle.close()


def holds_run(out):
    """Whether `out` holds a run worth protecting: one that got as far as a checkpoint, a model or its metrics.
    A run killed before its first checkpoint left at most a log: that is not a run, and a new one starts over."""
    return any((out / name).exists() for name in ("checkpoint", "checkpoint.old", "best", "metrics.json"))


def check_apart_from_model(cfg):
    """--output-dir must not be the --model folder, inside it or around it (checked before the folder is made): the
    run's files would change the model's own folder, and with it the hash every run trained from it resumes by.
    Nor inside a --dataset folder (one sub-folder per class), where the run's folder would be read as a class."""
    if cfg.output_dir is None:
        return
    where = Path(cfg.output_dir).expanduser().resolve()
    model, data = (Path(p).expanduser().resolve() if p else None for p in (cfg.model, cfg.dataset))
    if model and model.is_dir() and (where == model or model in where.parents or where in model.parents):
        raise UserError(f"--output-dir {cfg.output_dir} and --model {cfg.model} overlap (the same folder, or one "
                        "inside the other): a run would write into the model's folder, or replace the model it trains "
                        "from; choose another --output-dir")
    if data and data.is_dir() and (where == data or data in where.parents):
        raise UserError(f"--output-dir {cfg.output_dir} is inside the --dataset folder {cfg.dataset}: the run's folder "
                        "would be read as one of its classes; choose another --output-dir")


def check_output_dir(out, cfg):
    """Refuse to touch a run in `out` unless told what to do with it (before anything heavy loads)."""
    if not (cfg.overwrite or cfg.resume) and holds_run(out):
        raise UserError(f"{out} already holds a run; continue it with --resume, replace it with --overwrite, "
                        "or choose another --output-dir")
    if cfg.resume and not (out / "checkpoint").exists() and not (out / "checkpoint.old").exists():
        if holds_run(out):
            raise UserError(f"{out} has no checkpoint to resume from; replace the run with --overwrite")
        say(f"{out} has no checkpoint yet: starting the run from the beginning")


def replaced_outputs(cfg):
    """What a new run replaces: everything a run writes, except a tensorboard/ it does not write itself."""
    return [name for name in OUTPUTS if name != "tensorboard" or cfg.report_to == "tensorboard"]


def open_output_dir(out, state, cfg):
    """Make the folder ready for this run's writing. On resume: the log as it stood at the checkpoint (later rows
    are written again). A new run over an earlier one (--overwrite) moves the earlier outputs into out/.replaced/,
    where they wait until the new run has a result (then they go; if it fails, they come back: restore_earlier_run).
    Leftovers of a run that never reached a result are simply removed."""
    if cfg.resume and (out / "checkpoint").exists():
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["log"]))
        return
    keep = out / ".replaced"
    earlier = holds_run(out) and not keep.exists()  # with .replaced there already, what is here never finished
    if earlier:
        keep.mkdir()
    for name in replaced_outputs(cfg):
        for path in (out / name, out / f"{name}.tmp", out / f"{name}.old"):
            if earlier and path.name == name and path.exists():
                path.rename(keep / name)
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def discard_earlier_run(out):
    shutil.rmtree(out / ".replaced", ignore_errors=True)


def failed_run(e, cfg, out, main_process):
    """A failure after the model loaded, as the UserError to raise: what went wrong and what is kept. The run this
    one was replacing (--overwrite) is put back. An exception that is no user's doing is returned as it is."""
    if type(e).__name__ == "OutOfMemoryError":  # torch's
        reason = (f"out of GPU memory at --batch-size {cfg.batch_size} and --max-len {cfg.max_len}: lower "
                  "--batch-size (raise --grad-accum to keep the global batch), lower --max-len, or use --precision "
                  "bf16/fp16")
    elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
        reason = f"no space left on the device while writing to {out}: free some space"
    elif isinstance(e, OSError):
        reason = f"could not write to {out}: {e}"
    elif isinstance(e, UserError):
        reason = str(e)
    else:
        reason = None
    if main_process and (out / ".replaced").exists():
        for name in replaced_outputs(cfg):  # what this run wrote
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in (out / ".replaced").iterdir():
            path.rename(out / path.name)
        (out / ".replaced").rmdir()
        kept = f"the earlier run in {out} is restored as it was"
    elif checkpoint_step(out) is not None:
        kept = f"the checkpoint at step {checkpoint_step(out)} is kept (--resume continues from it)"
    else:
        kept = "no checkpoint was written yet"
    return e if reason is None else UserError(f"{reason}; {kept}")


def checkpoint_step(out):
    """The step of the checkpoint in `out`, or None when there is none."""
    state_file = recover(out / "checkpoint") / "state.json"
    return json.loads(state_file.read_text())["step"] if state_file.is_file() else None


def what_is_kept(out, cfg):
    """The line that ends an interrupted run: what it leaves, and how to go on (--resume refuses --overwrite)."""
    if checkpoint_step(out) is not None:
        line = (f"Interrupted: checkpoint saved at step {checkpoint_step(out)}. Resume with the same flags"
                f"{' without --overwrite' if cfg.overwrite else ''} plus: --output-dir {out} --resume")
    else:
        line = "Interrupted before the first checkpoint: nothing to resume (running again starts over)"
    if (out / ".replaced").exists():
        line += f". The earlier run's outputs wait in {out / '.replaced'} until this run finishes"
    return line


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


LINE_BREAKS_JSON_LEAVES = ("\x85", "\u2028", "\u2029")  # json.dumps escapes the others (below U+0020)


def json_line(obj):
    """One line of JSON Lines, readable as written (ensure_ascii=False), with the line breaks that some readers split
    on (U+2028 and the like) escaped as \\uXXXX: one object, one line, whatever reads it."""
    line = json.dumps(obj, ensure_ascii=False)
    for char in LINE_BREAKS_JSON_LEAVES:
        line = line.replace(char, f"\\u{ord(char):04x}")
    return line + "\n"


def write_jsonl(path, rows):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json_line(r) for r in rows)
    os.replace(tmp, path)  # atomic, as write_json


def save_findings(out, quality):
    """What analysis.assess found, beside the model: in best/config.json what predict.py needs (the temperature it
    divides the logits by, `calibration_temperature`; a multi-label model's `threshold`), errors.jsonl and, after a
    label audit, suspect_labels.jsonl."""
    config = out / "best" / "config.json"
    write_json(config, {**json.loads(config.read_text()), **quality["saved"]})
    write_jsonl(out / "errors.jsonl", quality["mistakes"])
    if quality["suspects"] is not None:
        write_jsonl(out / "suspect_labels.jsonl", quality["suspects"])


def swap_in(tmp, folder):
    """Replace `folder` by the complete `tmp` with renames: whenever a kill comes, one whole version survives
    (as `folder`, or as `folder.old` for the instant between the two renames: see recover)."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder):
    old = folder.with_name(folder.name + ".old")
    if not folder.exists() and old.exists():
        old.rename(folder)
    return folder


def readable_as_umask_allows(folder):
    """Every file below `folder` with the mode a new file gets (0644 under the usual umask 022): save_pretrained
    writes model.safetensors as 0600, which a server running as another user (a container's) cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.rglob("*"):
        if file.is_file():
            file.chmod(0o666 & ~umask)


def save_model(model, tokenizer, folder, accelerator):
    """The model and tokenizer (save_pretrained: safetensors, config with the class names). Written beside `folder`,
    then moved in file by file (os.replace: atomic), so that `folder` holds a whole, loadable model at every
    instant, for predict.py or a pipeline reading it during training: the old weights or the new ones (the config,
    the tokenizer and the class names are the same from epoch to epoch)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
        if isinstance(model, PeftModel):  # LoRA: the updates merged into a plain model; the adapter alone beside it
            model.save_pretrained(tmp / "adapter")
            (tmp / "adapter" / "README.md").unlink(missing_ok=True)  # peft's blank card; best/README.md is the card
            model = copy.deepcopy(model).merge_and_unload()  # a merged copy: the model in training keeps its LoRA
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        readable_as_umask_allows(tmp)
        if not folder.exists():
            tmp.rename(folder)
        else:
            for file in sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors"):  # the weights last
                if file.is_dir():
                    swap_in(file, folder / file.name)  # adapter/
                else:
                    os.replace(file, folder / file.name)
            tmp.rmdir()
    accelerator.wait_for_everyone()


def append_to_log(record, state, out, accelerator):
    """A row of log.jsonl (epoch rows, and step rows with --log-every), also sent to --report-to's tracker."""
    state["log"].append(record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
    if accelerator.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def log_step(state, scheduler, out, accelerator):
    """A step row: the mean train loss since the last row (per micro-batch) and the lr now."""
    loss_mark, batches_mark = state["log_mark"]
    loss = (state["loss_sum"] - loss_mark) / max(state["batches_done"] - batches_mark, 1)
    state["log_mark"] = [state["loss_sum"], state["batches_done"]]
    append_to_log({"kind": "step", "epoch": state["epoch"], "step": state["step"], "train_loss": loss,
                   "lr": scheduler.get_last_lr()[0]}, state, out, accelerator)


def start_tracker(cfg, accelerator):
    """--report-to: accelerate's tracker gets the config now and every log row as it comes (tensorboard: in
    output_dir/tensorboard)."""
    if cfg.report_to == "none":
        return
    hparams = {k: "none" if v is None else v for k, v in dataclasses.asdict(cfg).items()}  # trackers reject None
    accelerator.init_trackers("tensorboard" if cfg.report_to == "tensorboard" else "text-classifier", hparams)



# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: everything --resume needs to continue exactly where a run stopped

RESUMABLE_CHANGES = {"preset", "epochs", "resume", "overwrite", "output_dir", "checkpoint_every", "audit",
                     "keep_checkpoint", "threads"}


def new_state(cfg):
    """Where training stands. Saved with every checkpoint; the model, optimizer, schedule, loss scaler and random
    number generators are saved beside it by accelerate."""
    return {"epoch": 1, "batches_done": 0, "loss_sum": 0.0, "step": 0, "best_score": None, "best_epoch": None,
            "best_val": None, "log": [], "log_mark": [0.0, 0], "tokens": [0, 0], "train_seconds": 0.0,
            "bad_epochs": 0, "stopped": None,  # --patience: validations since the best; why and when it stopped
            "config": dataclasses.asdict(cfg)}


def save_checkpoint(out, state, accelerator, weights=True):
    """checkpoint/: state.json, and with `weights` what accelerate saves (model, optimizer, schedule, scaler, RNG
    states: about 3x the model) for training on; a finished run's checkpoint needs only state.json."""
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if weights:
        accelerator.save_state(tmp)  # every process writes its own RNG state; the main one the rest
    elif accelerator.is_main_process:
        tmp.mkdir()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state)
        swap_in(tmp, out / "checkpoint")
    accelerator.wait_for_everyone()


def save_only_trainable_weights(accelerator):
    """LoRA: the checkpoints hold only the weights that train (and, as always, their optimizer state); the frozen
    ones are the base model's, loaded from it again on --resume (load_checkpoint, strict=False)."""
    def drop_frozen(models, weights, output_dir):
        for model, state in zip(models, weights):
            for name, parameter in model.named_parameters():
                if not parameter.requires_grad:
                    state.pop(name, None)
    accelerator.register_save_state_pre_hook(drop_frozen)


def read_checkpoint_state(out, cfg):
    """The saved state, if the run in `out` can be continued with this config (checked before the weights load);
    a new state where the run never reached its first checkpoint."""
    state_file = recover(out / "checkpoint") / "state.json"
    if not (out / "checkpoint").exists():
        return new_state(cfg)
    try:
        state = json.loads(state_file.read_text())
        check_shape(state, new_state(cfg))
        saved_config = state["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"the checkpoint in {out} is damaged ({type(e).__name__}: {e}); replace the run with "
                        "--overwrite") from None
    now = dataclasses.asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {v!r} -> {now[k]!r}" for k, v in saved_config.items()
               if k not in RESUMABLE_CHANGES and now.get(k) != v]
    if changed:
        raise UserError(f"cannot resume {out} with other settings ({'; '.join(changed)}): they would change the "
                        "result; resume with the run's own flags (only --epochs may change) or start a new run")
    state["config"] = now
    state = {**new_state(cfg), **state}  # a checkpoint from before a key was added: that key's start value
    if epochs_left(state, cfg) and [p.name for p in (out / "checkpoint").iterdir()] == ["state.json"]:
        raise UserError(f"{out} finished, and a finished run keeps only checkpoint/state.json, not the weights and "
                        f"optimizer state that training on to --epochs {cfg.epochs} needs (unless it ran with "
                        "--keep-checkpoint); start a new run, with --keep-checkpoint to extend it later")
    return state


def check_shape(state, start):
    """A state.json that parses but is not a run's state ([], {"config": 5}, "epoch": "x"): a TypeError saying where,
    before any of it is used. Each key present must hold the kind new_state() starts it with (config.of_kind: an int
    for an int, a number for a float, a list, a dict); a None start takes anything."""
    if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
        raise TypeError("not a JSON object with a config object")
    for key, value in state.items():
        if start.get(key) is not None and not of_kind(value, type(start[key])):
            raise TypeError(f'"{key}" holds {value!r}')


def epochs_left(state, cfg):
    """Whether a run (resumed, with `state` from its checkpoint) has training steps to do."""
    return state["stopped"] is None and state["epoch"] <= cfg.epochs


def drop_checkpoint_weights(out):
    """What a finished run keeps of checkpoint/ without --keep-checkpoint: state.json (where it stopped, its log and
    config; small). The weights, optimizer state and random states (about 3x the model) only serve to train on."""
    for path in (out / "checkpoint").iterdir():
        if path.name != "state.json":
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def load_checkpoint(accelerator, out, strict=True):
    try:  # model, optimizer, schedule, scaler, RNG (weights_only loads); strict: every weight of the model is in it
        accelerator.load_state(out / "checkpoint", strict=strict)
    except Exception as e:
        raise UserError(f"the checkpoint in {out} is damaged ({type(e).__name__}: {str(e)[:200]}); replace the run "
                        "with --overwrite") from None


def check_same_inputs(state, what, fingerprint, out):
    """Resuming on other data or another model would continue from a state that belongs to neither run: refused.
    `what` (data or model) and its fingerprint are recorded in the state, which every checkpoint saves."""
    saved = state.setdefault("fingerprints", {}).setdefault(what, fingerprint)
    if saved != fingerprint:
        raise UserError(f"cannot resume {out}: the {what} changed since its checkpoint; resume on the run's own "
                        f"{what}, or start a new run (--overwrite replaces this one)")


def model_fingerprint(model, model_config):
    """A local model folder: a hash of its files; a Hub model: the commit it resolved to."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return getattr(model_config, "_commit_hash", None) or model
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.is_file()):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


STOP = {"accelerator": None}  # set while training steps run: a stop request then waits for the next step


@contextmanager
def stop_on_signals(out, cfg):
    """Ctrl-C or SIGTERM, at any phase, end the run with KeyboardInterrupt (exit code 130, and a line saying what
    is kept). During the training steps (graceful_stop) the request waits for the next optimizer step, which
    writes a checkpoint first; it is shared by all processes (accelerate's trigger), so they stop together.
    Elsewhere (reading data, validating, testing) it stops at once. A second Ctrl-C stops at once."""
    def request_stop(signum, frame):
        signal.signal(signum, signal.default_int_handler)  # the second: KeyboardInterrupt, wherever the run is
        if STOP["accelerator"] is None:
            raise KeyboardInterrupt
        STOP["accelerator"].set_trigger()
    signals = [signal.SIGINT, signal.SIGTERM]
    in_main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.getsignal(s) for s in signals} if in_main_thread else {}
    for s in previous:
        signal.signal(s, request_stop)
    try:
        yield
    except KeyboardInterrupt:
        say(f"\n{what_is_kept(out, cfg)}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def graceful_stop(accelerator):
    STOP["accelerator"] = accelerator
    try:
        yield
    finally:
        STOP["accelerator"] = None
