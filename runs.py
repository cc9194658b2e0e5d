"""The output folder of a run: choosing it, writing into it so that nothing is ever left half-written and an
earlier run is never overwritten by accident, checkpoints and what --resume checks before it continues, and the
signals that stop a run cleanly. Also `say`: what a run prints, from the main process only."""
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from config import UserError

OUTPUTS = ("best", "metrics.json", "log.jsonl", "checkpoint", "curves.png", "confusion.png", "lengths.png",
           "tensorboard")  # what a run writes in output_dir


def say(*args, **kwargs):
    """print, on the main process only: under several processes each would say the same thing."""
    PartialState().print(*args, **kwargs)



# ----------------------------------------------------------------------------------------------------------------
# Output folder: nothing is left half-written, and an earlier run is never overwritten by accident

def choose_output_dir(cfg):
    """A new runs/<preset>-<time> folder unless given; a given folder that holds a run needs --overwrite or
    --resume."""
    if cfg.output_dir is None:
        base = Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        out, n = base, 1
        while out.exists():
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        return Path(broadcast_object_list([str(out)])[0])  # every process must agree on the folder
    out = Path(cfg.output_dir)
    if not (cfg.overwrite or cfg.resume) and any((out / name).exists() for name in OUTPUTS):
        raise UserError(f"{out} already holds a run; continue it with --resume, replace it with --overwrite, "
                        "or choose another --output-dir")
    return out


def clear_earlier_run(out):
    """With --overwrite: remove only what a run writes (never the user's other files in that folder)."""
    for name in OUTPUTS:
        for path in (out / name, out / f"{name}.tmp", out / f"{name}.old"):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def open_output_dir(out, state, resume):
    """Make the folder ready for writing: on resume, the log as it stood at the checkpoint (later rows are written
    again); else no trace of an earlier run."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state["log"]))
    else:
        clear_earlier_run(out)


def write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half of one


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


def save_model(model, tokenizer, folder, accelerator):
    """The model and tokenizer (save_pretrained: safetensors, config with the class names), swapped in whole."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        swap_in(tmp, folder)
    accelerator.wait_for_everyone()


def append_to_log(record, state, out, accelerator):
    """A row of log.jsonl (epoch rows, and step rows with --log-every), also sent to --report-to's tracker."""
    state["log"].append(record)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
    if accelerator.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")



# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: everything --resume needs to continue exactly where a run stopped

RESUMABLE_CHANGES = {"preset", "epochs", "resume", "overwrite", "output_dir", "checkpoint_every"}


def new_state(cfg):
    """Where training stands. Saved with every checkpoint; the model, optimizer, schedule, loss scaler and random
    number generators are saved beside it by accelerate."""
    return {"epoch": 1, "batches_done": 0, "loss_sum": 0.0, "step": 0, "best_score": None, "best_epoch": None,
            "best_val": None, "log": [], "log_mark": [0.0, 0], "tokens": [0, 0], "train_seconds": 0.0,
            "config": dataclasses.asdict(cfg)}


def save_checkpoint(out, state, accelerator):
    tmp = out / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)  # every process writes its own RNG state; the main one the rest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / "state.json", state)
        swap_in(tmp, out / "checkpoint")
    accelerator.wait_for_everyone()


def read_checkpoint_state(out, cfg):
    """The saved state, if the run in `out` can be continued with this config (checked before anything loads)."""
    state_file = recover(out / "checkpoint") / "state.json"
    if not state_file.is_file():
        raise UserError(f"{out} has no checkpoint to resume from; start a new run without --resume")
    state = json.loads(state_file.read_text())
    now = dataclasses.asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {v!r} -> {now[k]!r}" for k, v in state["config"].items()
               if k not in RESUMABLE_CHANGES and now.get(k) != v]
    if changed:
        raise UserError(f"cannot resume {out} with other settings ({'; '.join(changed)}): they would change the "
                        "result; resume with the run's own flags (only --epochs may change) or start a new run")
    state["config"] = now
    return state


@contextmanager
def checkpoint_on_signals(accelerator):
    """Ctrl-C or SIGTERM asks the loop to stop at the next optimizer step, after writing a checkpoint. A second
    Ctrl-C stops at once. The request is shared by all processes (accelerate's trigger), so they stop together."""
    def request_stop(signum, frame):
        accelerator.set_trigger()
        signal.signal(signum, previous[signum])
    signals = [signal.SIGINT, signal.SIGTERM]
    in_main_thread = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.getsignal(s) for s in signals} if in_main_thread else {}
    for s in previous:
        signal.signal(s, request_stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

