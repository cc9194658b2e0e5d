"""Fine-tune a pretrained transformer (DistilBERT by default) into a text classifier, with a plain PyTorch loop.

    python train.py                                  # DistilBERT on IMDB, about 93% test accuracy
    python train.py --preset demo                    # small real model + real data, offline, minutes on a CPU
    python train.py --dataset my.csv --model ./bert  # your data, your checkpoint
    accelerate launch --num_processes 4 train.py     # the same job on 4 GPUs

Read top to bottom: model -> optimizer/schedule -> loop -> validate -> save best -> test once. The data side
(reading, splits, tokenizing, batches) is in data.py; the output folder (checkpoints, resume, safe writes) in
runs.py. In a notebook: `from train import train; metrics = train(Config(...))`.
"""
import os
import signal
import sys

from config import HEAD_LR_FACTOR, LORA_LR_FACTOR, Config, UserError, parse_args_or_exit, settle


def interrupted_before_the_run(signum, frame):
    """Ctrl-C or SIGTERM before train() takes them over (runs.stop_on_signals), as during the imports below (seconds):
    one line and exit code 130, as in every later phase, not a traceback (Ctrl-C) nor a silent exit 143 (SIGTERM)."""
    if os.environ.get("RANK", "0") == "0":  # several processes (torchrun): the main one speaks
        print("\nInterrupted before the run started: nothing written", flush=True)
    raise SystemExit(130)


if __name__ == "__main__":  # before the imports below: --help and a bad flag answer at once, and a stop is one line
    signal.signal(signal.SIGINT, interrupted_before_the_run)
    signal.signal(signal.SIGTERM, interrupted_before_the_run)
    CLI_CONFIG = parse_args_or_exit()

import dataclasses
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from peft import LoraConfig, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

import analysis
import baseline
import report
from analysis import classification_metrics, scores  # noqa: F401 -- classification_metrics: train's API as before
from data import (absolute_paths, check_local_paths, check_tokenizer, class_weights, describe, describe_duplicates,
                  duplicates, fingerprint, is_multi_label, is_pairs, load_data, make_loaders, model_inputs,
                  offline_hint, tokenize, use_cache_only_if_offline)
from runs import (append_to_log, check_apart_from_model, check_output_dir, check_same_inputs, choose_output_dir,
                  discard_earlier_run, drop_checkpoint_weights, epochs_left, failed_run, graceful_stop,
                  load_checkpoint, locked, log_step, model_fingerprint, new_state, open_output_dir,
                  read_checkpoint_state, save_checkpoint, save_findings, save_model, save_only_trainable_weights, say,
                  say_if_launched_as_one, start_tracker, stop_on_signals, write_json)

# Our own bars and lines are the output; the libraries' progress bars for caching and saving are noise.
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# Model, precision, optimizer

def load_model_config(cfg):
    """The model's config.json (small, fast): fails early for a bad --model and checks --max-len against it."""
    try:
        model_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{cfg.model}' is not a local model folder nor a model on the Hub "
                        f"({str(e).splitlines()[0]}){offline_hint()}") from None
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and cfg.max_len > limit:
        raise UserError(f"--max-len {cfg.max_len} is beyond what {cfg.model} can read ({limit} positions)")
    return model_config


def default_lr(hidden_size, lora_r=0):
    """The peak lr when --lr is not given: 2e-5 for models 768 wide or wider (DistilBERT, BERT-base: the main job's
    recipe), 1e-4 for narrower ones (MiniLM-L6 is 384 wide: at 2e-5 it lost to the TF-IDF baseline on 1,600 tweets,
    see docs/quality.md; small models want higher rates, as in Turc et al. 2019). LoRA: LORA_LR_FACTOR times that."""
    base = 2e-5 if hidden_size >= 768 else 1e-4
    return base * (LORA_LR_FACTOR if lora_r else 1)


BF16_PAYS_FROM = 1.3  # bf16 training also pays for its casts: a matmul speedup below this is not worth them


def cpu_bf16_speedup(hidden, tokens, seconds=None, budget=0.1):
    """How many times faster this CPU multiplies in bf16 than in fp32, measured (a fraction of a second) on the
    model's shape: [tokens x hidden] @ [hidden x hidden]. Its flags do not tell: with AVX512-BF16 and no AMX, bf16 ran
    0.66x fp32 on an Intel Xeon and 2.5x on an AMD EPYC (Zen 4). A 16-token try comes first: where bf16 is emulated
    in software (AVX2 only), one model-sized bf16 matmul takes seconds. `seconds(dtype, rows)`: one timing (tests)."""
    operands = {}

    def matmul_seconds(dtype, rows):
        if (dtype, rows) not in operands:
            operands[dtype, rows] = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, hidden, dtype=dtype)
            operands[dtype, rows][0] @ operands[dtype, rows][1]  # the first call picks and builds the kernel
        a, b = operands[dtype, rows]
        started = time.perf_counter()
        a @ b
        return time.perf_counter() - started

    def ratio(rows):
        # fp32 and bf16 in turn, for at least 3 rounds and `budget` seconds, the best of each: a burst of load from
        # another process (a program starting on one of 2 cores) then slows a few rounds of both, not the only
        # three of one (the same AMX Xeon once measured bf16 at 0.43x instead of 7x that way).
        times = {torch.float32: [], torch.bfloat16: []}
        while len(times[torch.float32]) < 3 or (sum(map(sum, times.values())) < budget
                                                 and len(times[torch.float32]) < 200):
            for dtype, measured in times.items():
                measured.append(seconds(dtype, rows))
        return min(times[torch.float32]) / min(times[torch.bfloat16])
    seconds = seconds or matmul_seconds
    speedup = ratio(16)
    return speedup if speedup < 0.5 else ratio(tokens)


def choose_precision(requested, cuda_capability, cpu_bf16_speedup=None):
    """fp32 / bf16 / fp16. `auto`: bf16 on Ampere and newer GPUs (compute capability >= 8.0); fp16 with loss
    scaling on older ones (T4, V100), whose bf16 is emulated and slow; on a CPU, bf16 where cpu_bf16_speedup (the
    measured one) is at least BF16_PAYS_FROM, else fp32."""
    if requested == "fp16" and cuda_capability is None:
        raise UserError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32")
    if requested != "auto":
        return requested
    if cuda_capability is None:
        return "bf16" if (cpu_bf16_speedup or 0) >= BF16_PAYS_FROM else "fp32"
    return "bf16" if cuda_capability >= (8, 0) else "fp16"


def precision_for(cfg, capability, model_config):
    """(--precision resolved by choose_precision, the CPU's bf16 speedup it was chosen by or None): on a CPU with
    `auto`, bf16 only where it is measured faster, on the model's width; one verdict for all processes."""
    speedup = None
    if cfg.precision == "auto" and capability is None:
        tokens = min(cfg.batch_size * cfg.max_len, 4096)
        speedup = broadcast_object_list([cpu_bf16_speedup(model_config.hidden_size, tokens)])[0]
    return choose_precision(cfg.precision, capability, speedup), speedup


def choose_attention(requested, device_type, precision):
    """For training: sdpa (PyTorch's fused attention), except for bf16 on a CPU, where eager attention trained
    faster on both CPUs measured (2.1x on an AMD EPYC Zen 4, 1.13x with AMX; while sdpa evaluated as fast or faster:
    the test split is evaluated with sdpa; see docs/speed.md). Measured once, not probed at each start."""
    if requested != "auto":
        return requested
    return "eager" if device_type == "cpu" and precision == "bf16" else "sdpa"


def load_model(cfg, names, attention="sdpa", pairs=False):
    """The pretrained encoder with a fresh classification head for our classes (multi-label: one sigmoid each, its
    loss BCEWithLogitsLoss; the saved config says so, and a `pipeline` then gives every label's probability)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its missing-keys report is replaced by our one line below
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            cfg.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
            problem_type="multi_label_classification" if cfg.problem == "multi_label" else None,  # None: the usual
            output_loading_info=True, use_safetensors=True, trust_remote_code=cfg.trust_remote_code,
            attn_implementation=attention,
            dtype=torch.float32)  # weights stored in fp16 or bf16, trained as stored, lost their updates (a nan loss)
    except Exception as e:  # .bin-only weights (only safetensors are loaded), a truncated file: one line
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        raise UserError(f"could not load the weights of {cfg.model} (safetensors): {str(e).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    model.config.truncation = cfg.truncation  # saved in best/config.json: predict.py cuts long texts alike
    model.config.text_pair = pairs  # and predict.py reads (text, pair) tuples, or "first<TAB>second" lines
    model.config.max_len = cfg.max_len  # and cuts them at the length the model was trained and tested at
    outputs = f"{len(names)} {'labels' if cfg.problem == 'multi_label' else 'classes'}"
    report.new_weights(info, model.base_model_prefix, outputs, cfg.model)  # the new head; a warning if more
    return add_lora(model, cfg) if cfg.lora_r else model


# peft's table of the layers LoRA adapts by default lacks DistilBERT, our default model: its attention's query and
# value, as peft has them for BERT
LORA_TARGETS = {"distilbert": ["q_lin", "v_lin"]}


def add_lora(model, cfg):
    """LoRA through peft: the encoder frozen, low-rank updates trained beside its --lora-targets layers, and the
    classification head trained in full: every module outside the encoder (peft's SEQ_CLS alone would leave
    DistilBERT's new pre_classifier frozen at its random start)."""
    head = [name for name, module in model.named_children()
            if name != model.base_model_prefix and next(module.parameters(), None) is not None]
    if cfg.lora_targets in (None, "all-linear"):
        targets = cfg.lora_targets or LORA_TARGETS.get(model.config.model_type)  # None: peft's for the architecture
    else:
        targets = [name.strip() for name in cfg.lora_targets.split(",")]
        encoder = [name for name, _ in model.get_submodule(model.base_model_prefix).named_modules()]
        unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in encoder)]
        if unknown:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.get_submodule(model.base_model_prefix)
                             .named_modules() if isinstance(m, torch.nn.Linear)})
            raise UserError(f"--lora-targets {', '.join(unknown)}: no such layer in {cfg.model}; its linear layers are "
                            f"{', '.join(linear)} (or pass all-linear)")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=head)
    try:
        with warnings.catch_warnings():  # a deprecation inside peft's own calls to transformers: nothing to act on
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as e:  # no default layers for this architecture; layers LoRA cannot adapt
        hint = " (name them with --lora-targets, or pass all-linear)" if targets is None else ""
        raise UserError(f"LoRA on {cfg.model} ({model.config.model_type}): {str(e).splitlines()[0]}{hint}") from None


def parameters_line(model, lora_r):
    """'66.9M parameters'; with LoRA: how many train, of the model as best/ saves it (the updates merged in)."""
    if not lora_r:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.3g}M parameters"
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = sum(p.numel() for p in model.parameters() if not p.requires_grad)  # the head's frozen copy counts once
    layers = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)})
    return f"{trained / 1e6:.3g}M of {saved / 1e6:.3g}M parameters trained: LoRA r={lora_r} on {', '.join(layers)}, " \
        "the head in full"


def start_at_the_prior(model, labels, n, balanced=False):
    """The new head's output bias (its `n` values) set to where the loss of a model that reads nothing is least: the
    training labels' log-odds (multi-label) or log-frequencies (single-label); with --class-weights balanced 0, as
    initialized, since the weights make every label or class weigh alike. The model then starts at the prior,
    and its steps go to what the texts say rather than to how common each label is (a multi-label run that started
    at p = 0.5 for every label spent its few steps there). A head that does not end in a bias is left as it is."""
    # the output layer comes last in every head we know; with LoRA, its trained copy (peft's modules_to_save)
    name, bias = [(name, p) for name, p in model.named_parameters() if p.requires_grad][-1]
    if balanced or not name.endswith("bias") or bias.shape != (n,):
        return
    labels = torch.as_tensor(labels).float()
    if labels.ndim == 2:
        share = labels.mean(0).clamp(1e-4, 1 - 1e-4)  # a label in no training text: not -inf
        prior = share.log() - (-share).log1p()
    else:
        prior = (torch.bincount(labels.long(), minlength=n) / len(labels)).clamp(min=1e-4).log()
    with torch.no_grad():
        bias.copy_(prior)


def head_lr_factor(cfg):
    """How many times the encoder's lr the head trains at: HEAD_LR_FACTOR for multi-label, where each label is a
    decision of its own from the shared features and most labels are rare (at 1x, 360 steps taught a 33-label head
    the frequent labels only; docs/quality.md); 1 for single-label (the main job's recipe) and for LoRA, whose lr
    is already LORA_LR_FACTOR times."""
    return HEAD_LR_FACTOR if cfg.problem == "multi_label" and not cfg.lora_r else 1


def make_optimizer(model, cfg, fused):
    """AdamW; biases and LayerNorm weights (the 1-d parameters) get no weight decay; the head (the layers after the
    encoder: its pooler, if any, and what the model class adds on top) at head_lr_factor(cfg) times the lr."""
    factor, encoder = head_lr_factor(cfg), model.base_model_prefix + "."
    groups = {}  # (lr, weight decay): parameters
    for name, p in model.named_parameters():
        if p.requires_grad:
            in_head = factor != 1 and (not name.startswith(encoder) or ".pooler." in name)
            groups.setdefault((cfg.lr * factor if in_head else cfg.lr, cfg.weight_decay if p.ndim >= 2 else 0.0),
                              []).append(p)
    ordered = sorted(groups.items(), key=lambda group: (group[0][0], -group[0][1]))  # the encoder's, decayed first
    return torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in ordered],
                             lr=cfg.lr, fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def split_logits(model, loader, accelerator, exact=False):
    """(logits, labels) of the whole split, in the split's row order (the batches' `idx`; a loader without it:
    the loader's order). Under several processes each sees a shard; gather_for_metrics collects them and drops the
    examples duplicated to even out the last batch, so every example counts once. exact: in full fp32 (no autocast,
    no TF32), as predict.py and serve.py compute, whatever the run's precision: the test split's figures and files
    are then what they give (bf16 logits tie in their 8-bit mantissa, so a coverage threshold read off them missed)."""
    was_training, matmuls = model.training, torch.get_float32_matmul_precision()
    model.eval()
    gathered = []
    torch.set_float32_matmul_precision("highest" if exact else matmuls)
    for batch in loader:
        idx = batch.pop("idx", None)
        with nullcontext() if exact else accelerator.autocast():
            logits = model(**batch).logits.float()
        outputs = (logits, batch["labels"]) + (() if idx is None else (idx,))
        gathered.append([t.cpu() for t in accelerator.gather_for_metrics(outputs)])
    model.train(was_training)
    torch.set_float32_matmul_precision(matmuls)
    logits, labels, *idx = (torch.cat(ts) for ts in zip(*gathered))
    order = idx[0].argsort() if idx else slice(None)
    return logits[order], labels[order]


def evaluate(model, loader, accelerator, names, threshold=0.5):
    """Metrics over the whole split (analysis.scores; multi-label labels at `threshold`)."""
    return scores(*split_logits(model, loader, accelerator), names, threshold)


# ----------------------------------------------------------------------------------------------------------------
# Training

@dataclasses.dataclass
class Run:
    """One run's working set, in one place: built by setup(), read by every step after it (fit, finish). `state` is
    how far the run has come (epoch, step, best score, its log: runs.new_state), saved in every checkpoint."""
    cfg: Config
    accelerator: Accelerator
    state: dict
    out: Path = None  # the output folder
    model: torch.nn.Module = None  # prepared by accelerate, as are the optimizer, schedule and loaders
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    loaders: dict = None  # {split: DataLoader}; "audit" reads the training split in order, after training
    tokenizer: object = None
    data: dict = None  # {split: the examples as read (texts, labels)}
    names: list = None  # the class (or label) names, in the model's output order
    weights: torch.Tensor = None  # --class-weights: the loss's weight per class or label; None: the plain loss
    precision: str = "fp32"
    lengths: dict = None  # the training texts' token lengths (report.length_stats), for lengths.png
    duplicates: dict = None  # validation and test texts that are also training texts (data.duplicates)


def train_epoch(run, batches, bar, on_step=lambda: None):
    """The rest of one pass over the training data (all of it, unless resuming mid-epoch); updates `run.state`.

    Gradients of `grad_accum` micro-batches add up before each optimizer step, which comes on the LAST micro-batch
    of each group and on the epoch's last, possibly partial, group. Each loss is divided by its group's size, so a
    group's gradient is the mean over its examples, exactly as one big batch would give."""
    model, optimizer, scheduler, accelerator, cfg, state = \
        run.model, run.optimizer, run.scheduler, run.accelerator, run.cfg, run.state
    model.train()
    n = state["batches_done"] + len(batches)  # micro-batches in the whole epoch
    group_loss, group_tokens, group_positions = 0.0, 0, 0
    for i, batch in enumerate(batches, start=state["batches_done"]):
        group_start = i - i % cfg.grad_accum
        group_size = min(cfg.grad_accum, n - group_start)
        step_now = i + 1 == group_start + group_size
        with nullcontext() if step_now else accelerator.no_sync(model):  # no gradient all-reduce mid-group
            output = model(**batch)  # with --class-weights the loss is ours: the model's own takes no weights
            loss = output.loss if run.weights is None else weighted_loss(output.logits.float(), batch["labels"],
                                                                         run.weights)
            accelerator.backward(loss / group_size)
        group_loss += loss.detach()
        group_tokens += batch["attention_mask"].sum()  # real tokens; the rest of the positions are padding
        group_positions += batch["attention_mask"].numel()
        bar.update(1)
        if not step_now:
            continue
        group_total = float(group_loss)
        loss_value = group_total / group_size
        if not math.isfinite(loss_value):
            raise UserError(f"the training loss became {loss_value} at step {state['step'] + 1}: lower --lr, keep "
                            "--max-grad-norm on, or use --precision fp32/bf16")
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.update(batches_done=i + 1, step=state["step"] + 1, loss_sum=state["loss_sum"] + group_total,
                     tokens=[state["tokens"][0] + int(group_tokens), state["tokens"][1] + group_positions])
        group_loss, group_tokens, group_positions = 0.0, 0, 0
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        on_step()
    total = accelerator.reduce(torch.tensor(state["loss_sum"], device=accelerator.device), reduction="mean")
    return float(total) / n  # mean loss per micro-batch, over all processes


def weighted_loss(logits, labels, weights):
    """The loss with --class-weights: weighted cross-entropy; multi-label (0/1 rows): BCE with them as pos_weight."""
    if labels.ndim == 2:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, pos_weight=weights)
    return torch.nn.functional.cross_entropy(logits, labels, weight=weights)


def end_of_epoch(run, record, started):
    """Validate, log, keep the best model; returns the summary line, and the validation logits when this epoch's
    model became best/ (finish() calibrates on them instead of reading the validation split a second time)."""
    cfg, state, out = run.cfg, run.state, run.out
    val_logits = split_logits(run.model, run.loaders["validation"], run.accelerator) \
        if "validation" in run.loaders else None
    val = scores(*val_logits, run.names, cfg.threshold) if val_logits else None
    if val:
        record.update({f"val_{k}": val[k] for k in ("accuracy", "f1_micro", "f1_macro", "loss") if k in val})
    seconds = time.time() - started
    record["seconds"] = round(seconds, 2)
    score = val[cfg.metric_for_best] if val else None
    best = state["best_val"]  # of equal scores (24 validation texts all right), the lower validation loss is better
    improved = val is None or best is None or (score, -val["loss"]) > (state["best_score"], -best["loss"])
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    if cfg.patience and state["bad_epochs"] >= cfg.patience:  # early stopping
        record["stopped"] = f"no improvement in val {cfg.metric_for_best} for {state['bad_epochs']} epochs"
        state["stopped"] = {"epoch": state["epoch"], "reason": record["stopped"]}
    append_to_log(record, state, out, run.accelerator)
    if improved:
        save_model(run.model, run.tokenizer, out / "best", run.accelerator)
        state.update(best_score=score, best_epoch=state["epoch"], best_val=val)
    summary = f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}" + \
        (f" · val {report.headline(val)}" if val else "")
    summary += f" · lr {record['lr']:.2e} · padding {record['padding']:.0%} · {seconds:.0f}s" + \
        (" *" if improved else "") + (f"\nStopped early: {record['stopped']}" if "stopped" in record else "")
    return summary, val_logits if improved else None


def fit(run):
    """The epochs, from wherever `run.state` stands, with checkpoints every `checkpoint_every` steps and at epoch
    ends. Returns the validation logits of the best model, if one of these epochs made it (else None)."""
    cfg, state, out, accelerator, loaders = run.cfg, run.state, run.out, run.accelerator, run.loaders

    def stop_if_asked():
        if accelerator.check_trigger():  # Ctrl-C / SIGTERM during the steps, on any process: a checkpoint first
            save_checkpoint(out, state, accelerator)
            raise KeyboardInterrupt

    def on_step():
        stop_if_asked()
        if cfg.log_every and state["step"] % cfg.log_every == 0:
            log_step(state, run.scheduler, out, accelerator)
        if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
            save_checkpoint(out, state, accelerator)

    main, best_val_logits = accelerator.is_main_process, None
    epochs = range(state["epoch"], 0 if state["stopped"] else cfg.epochs + 1)  # none left after an early stop
    for epoch in tqdm(epochs, desc="epochs", disable=not main):
        started = time.time()
        state["epoch"] = epoch
        loaders["train"].set_epoch(epoch)  # a new, seeded order each epoch
        batches = accelerator.skip_first_batches(loaders["train"], state["batches_done"])
        with tqdm(total=len(loaders["train"]), initial=state["batches_done"], desc=f"epoch {epoch}", leave=False,
                  disable=not main) as bar, graceful_stop(accelerator):
            train_loss = train_epoch(run, batches, bar, on_step)
        stop_if_asked()  # a request that came after the epoch's last step
        state["train_seconds"] += time.time() - started
        tokens = accelerator.reduce(torch.tensor(state["tokens"], device=accelerator.device), reduction="sum")
        record = {"kind": "epoch", "epoch": epoch, "step": state["step"], "train_loss": train_loss,
                  "lr": run.scheduler.get_last_lr()[0],
                  "padding": round(1 - int(tokens[0]) / max(int(tokens[1]), 1), 4),
                  "tokens": int(tokens[0]), "positions": int(tokens[1])}  # real tokens; positions incl. padding
        summary, val_logits = end_of_epoch(run, record, started)
        best_val_logits = best_val_logits if val_logits is None else val_logits
        state.update(epoch=epoch + 1, batches_done=0, loss_sum=0.0, log_mark=[0.0, 0], tokens=[0, 0])
        # after the last epoch only state.json: a finished run drops its weights and optimizer anyway (finish())
        to_train_on = cfg.keep_checkpoint or epochs_left(state, cfg)
        save_checkpoint(out, state, accelerator, to_train_on)
        if main:
            tqdm.write(summary)  # tqdm.write keeps the bars intact
        if state["stopped"]:
            break
    return best_val_logits


# ----------------------------------------------------------------------------------------------------------------
# Setup, the run, the finish

def enough_epochs(cfg, steps_per_epoch):
    """cfg with epochs raised until training takes at least --min-steps optimizer steps. A few hundred rows give
    a few dozen steps in 3 epochs: too few for a new head and the encoder to learn the task (a TF-IDF baseline
    then wins). IMDB's 22,500 training rows (25,000 less validation) take 1,407 steps an epoch: the main job is left
    as it is."""
    needed = math.ceil(cfg.min_steps / steps_per_epoch)
    if needed <= cfg.epochs:
        return cfg
    say(f"Small data: {steps_per_epoch} optimizer steps an epoch, so {needed} epochs instead of {cfg.epochs} to reach "
        f"--min-steps {cfg.min_steps}" + ("" if cfg.patience else " (--patience N stops once validation stops improving)"))
    return dataclasses.replace(cfg, epochs=needed)


def setup(cfg, accelerator, state, out, bf16_speedup=None):
    """The Run: data (the texts), tokenizer, model, optimizer, schedule, loaders, all prepared for the devices.
    bf16_speedup: what the precision was chosen by on a CPU (cpu_bf16_speedup), for the Model line."""
    with accelerator.main_process_first():  # the main process reads and tokenizes first; the others hit its cache
        data, names = load_data(cfg)
        cfg = settle(cfg, is_multi_label(data["train"]))  # the problem (multi-label?) and metric-for-best's auto
        check_same_inputs(state, "data", fingerprint(data, names), out)  # a resumed run: the same data
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code,
                                                  truncation_side="left" if cfg.truncation == "tail" else "right")
        texts = model_inputs(data["train"])  # the texts, or (text, pair) tuples
        check_tokenizer(tokenizer, texts, cfg.model)  # no tokenizer files: all [UNK]s
        lengths = report.length_stats(texts, tokenizer, cfg.max_len, cfg.seed)
        tokens = tokenize(data, tokenizer, cfg.max_len, cfg.truncation)
    # saved in best/ with the tokenizer (and truncation_side): a plain pipeline(..., truncation=True) then cuts where
    # training did, keeping the end for --truncation tail (head+tail is predict.py's alone)
    tokenizer.model_max_length = cfg.max_len
    say(describe(data, names, cfg))
    repeated = duplicates(data)  # test texts seen in training overstate its scores: said here, kept in metrics.json
    if warning := describe_duplicates(repeated, data):
        say(warning)
    say(report.describe_lengths(lengths, cfg.truncation))
    precision = accelerator.mixed_precision.replace("no", "fp32")
    attention = choose_attention(cfg.attention, accelerator.device.type, precision)
    model = load_model(cfg, names, attention, pairs=is_pairs(data["train"]))
    start_at_the_prior(model, data["train"]["label"], len(names), cfg.class_weights == "balanced")
    optimizer = make_optimizer(model, cfg, fused=accelerator.device.type in ("cuda", "cpu"))  # 3x faster steps on a CPU
    loaders = make_loaders(tokens, tokenizer, cfg, accelerator.device.type, accelerator.num_processes)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders.values())
    loaders = dict(zip(loaders, prepared))
    cfg = enough_epochs(cfg, math.ceil(len(loaders["train"]) / cfg.grad_accum))
    if cfg.lora_r:
        save_only_trainable_weights(accelerator)  # a checkpoint of megabytes: the frozen weights are the model's
    total_steps = math.ceil(len(loaders["train"]) / cfg.grad_accum) * cfg.epochs  # optimizer steps, per process
    scheduler = accelerator.prepare(get_scheduler(
        "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler, optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps))
    n = accelerator.num_processes
    shown = f"bf16 {bf16_speedup:.2g}× fp32 here: {precision}" if bf16_speedup is not None else precision
    say(f"Model: {cfg.model} ({parameters_line(model, cfg.lora_r)}) · {shown}, "
        f"{attention} attention on {accelerator.device} · {n} process(es) · batch {cfg.batch_size} × {n} × "
        f"grad_accum {cfg.grad_accum} = {cfg.batch_size * n * cfg.grad_accum} · {total_steps} steps · lr {cfg.lr:g}"
        + (f" (the head {cfg.lr * head_lr_factor(cfg):g})" if head_lr_factor(cfg) != 1 else ""))
    weights = class_weights(data["train"]["label"], len(names), cfg.class_weights, accelerator.device)
    return Run(cfg=cfg, accelerator=accelerator, state=state, out=out, model=model, optimizer=optimizer,
               scheduler=scheduler, loaders=loaders, tokenizer=tokenizer, data=data, names=names, weights=weights,
               precision=precision, lengths=lengths, duplicates=repeated)


def train(cfg: Config):
    """Fine-tune cfg.model on cfg.dataset; returns the metrics (also written to output_dir/metrics.json)."""
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # --threads; else torch's default (OMP_NUM_THREADS, or one per core)
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability and capability >= (8, 0):
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the matmuls left in fp32
    several_cpu_processes = capability is None and int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun on CPUs
    say_if_launched_as_one()
    check_local_paths(cfg)  # a mistyped --dataset is told at once, not after the model's checks
    AcceleratorState._reset_state()  # accelerate keeps its settings per process: a notebook's next run may differ
    PartialState(cpu=several_cpu_processes)  # the processes meet first: they must agree on the output folder
    check_apart_from_model(cfg)  # before choose_output_dir makes the folder
    out = choose_output_dir(cfg)
    with locked(out), stop_on_signals(out, cfg):
        check_output_dir(out, cfg)
        use_cache_only_if_offline(cfg)
        model_config = load_model_config(cfg)
        if cfg.lr is None:  # the rate that suits the model's width (before a resume compares it with the run's)
            cfg = dataclasses.replace(cfg, lr=default_lr(model_config.hidden_size, cfg.lora_r))
        state = read_checkpoint_state(out, cfg) if cfg.resume else new_state(cfg)
        precision, speedup = precision_for(cfg, capability, model_config)
        accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision,
                                  cpu=several_cpu_processes, project_dir=str(out),
                                  log_with=None if cfg.report_to == "none" else cfg.report_to,
                                  dynamo_backend="inductor" if cfg.compile else None,  # prepare() compiles the model
                                  step_scheduler_with_optimizer=False)  # we step it, once per optimizer step
        check_same_inputs(state, "model", model_fingerprint(cfg.model, model_config), out)
        set_seed(cfg.seed)  # the classifier head's init, dropout and the data order all follow from it
        run = setup(cfg, accelerator, state, out, speedup)
        cfg = run.cfg  # settled by the data (multi-label?) and raised to --min-steps
        trained = state["epoch"] - 1  # whole epochs done (a resumed run's)
        if trained > cfg.epochs:  # its record (metrics.json, the card) would say "best epoch 4 of 1"
            raise UserError(f"{out} has trained {trained} epochs, more than --epochs {cfg.epochs}: a resumed run can "
                            f"go on (--epochs above {trained}), not take epochs back; resume with --epochs {trained} "
                            "to evaluate it again, or start a new run")
        if state["step"] and epochs_left(state, cfg):
            load_checkpoint(accelerator, out, strict=not cfg.lora_r)  # LoRA: the frozen weights are not in it
            say(f"Resuming {out} at epoch {state['epoch']}, step {state['step']}")
        elif state["step"]:  # nothing left to train: the test of best/ again (a finished checkpoint has no weights)
            say(f"{out} has trained its epochs: evaluating its best model again")
        try:
            if accelerator.is_main_process:
                open_output_dir(out, state, cfg)
                if cfg.length_histogram:
                    report.optional_output("lengths.png", report.plot_lengths, run.lengths, out / "lengths.png")
            start_tracker(cfg, accelerator)
            reference = baseline.for_run(cfg, run.data, run.names) if accelerator.is_main_process else (None,) * 3
            val_logits = fit(run)
            return finish(run, started, val_logits, reference)
        except Exception as e:  # after the model loaded: put back an earlier run, say what is kept
            raise failed_run(e, cfg, out, accelerator.is_main_process) from None


def finish(run, started, val_logits=None, reference=(None,) * 3):
    """Evaluate the saved best model on the test split, once; calibrate it on the validation split and audit the
    training labels with it (analysis.py); write metrics.json (with `reference`: the baseline's test metrics, or
    why there are none, and its test logits: how sure the difference is), the temperature into best/ and the rest.
    val_logits: the best model's validation logits from its epoch's end (the weights saved in best/), if this
    process trained it; else (a resumed run whose best epoch came earlier) the validation split is read here."""
    cfg, out, state, loaders, accelerator, names, data = \
        run.cfg, run.out, run.state, run.loaders, run.accelerator, run.names, run.data
    accelerator.wait_for_everyone()  # what you evaluate is exactly what you ship: the files in best/
    best_model = AutoModelForSequenceClassification.from_pretrained(
        out / "best", use_safetensors=True,
        attn_implementation="sdpa" if cfg.attention == "auto" else cfg.attention).to(accelerator.device)
    logits_of = lambda split, exact=False: \
        split_logits(best_model, loaders[split], accelerator, exact) if split in loaders else None
    test_started, sizes = time.time(), {split: len(examples) for split, examples in data.items()}
    test_logits = logits_of("test", exact=True)  # fp32: the figures, errors.jsonl and coverage are predict.py's
    test_seconds, seconds = time.time() - test_started, state["train_seconds"]
    val_logits, audit_started = val_logits or logits_of("validation"), time.time()
    audit_logits, audit_seconds = logits_of("audit"), time.time() - audit_started  # the label audit's cost
    texts = {split: model_inputs(data[split]) for split in ("test", "train")}
    quality = analysis.assess(test_logits, val_logits, audit_logits, names, texts, cfg.threshold)
    test = {**scores(*test_logits, names, quality["threshold"]), **quality["test"]}  # multi: the tuned threshold
    if reference[0] is not None:  # the model minus the baseline on resampled test sets: within the noise, or not
        reference[0]["difference"] = analysis.paired_difference(
            analysis.as_rows(*test_logits, quality["threshold"]),
            analysis.as_rows(reference[2], test_logits[1], reference[0].get("threshold", 0.5)), cfg.metric_for_best)
    metrics = {"best_epoch": state["best_epoch"], "val": state["best_val"], "test": test,
               "stopped_early": state["stopped"],  # --patience: {"epoch", "reason"}; null when every epoch ran
               "baseline": reference[0], "baseline_skipped": reference[1],  # baseline.py: TF-IDF + LR, or why not
               "duplicates": run.duplicates,  # test (validation) texts also in training; training texts labelled twice
               "config": dataclasses.asdict(absolute_paths(cfg)),  # local data paths absolute: found from anywhere
               "output_dir": str(out), "precision": run.precision,
               "num_processes": accelerator.num_processes,  # global batch = batch_size x processes x grad_accum:
               "global_batch_size": cfg.batch_size * accelerator.num_processes * cfg.grad_accum,
               "audit": None if audit_logits is None else {"n": sizes["train"], "suspects": len(quality["suspects"])},
               "timing": {"total_seconds": round(time.time() - started, 2), "train_seconds": round(seconds, 2),
                          "train_examples_per_second": round(sizes["train"] * (state["epoch"] - 1)  # epochs trained
                                                             / max(seconds, 1e-9), 2),
                          "test_seconds": round(test_seconds, 2),
                          "test_examples_per_second": round(test["n"] / test_seconds, 2),
                          "audit_seconds": None if audit_logits is None else round(audit_seconds, 2)}}
    if accelerator.is_main_process:
        save_findings(out, quality)  # the temperature into best/config.json, errors.jsonl, suspect_labels.jsonl
        write_json(out / "best" / "monitoring.json", analysis.monitoring_reference(  # what serve.py watches drift by
            data["train"]["label"], test_logits[0], quality.get("temperature"), texts["train"],
            AutoTokenizer.from_pretrained(out / "best"), cfg.max_len, names))
        write_json(out / "metrics.json", metrics)  # with best/, the essential output; the rest is nice to have
        discard_earlier_run(out)  # the outputs of the run this one replaces (--overwrite): this one has a result
        if not cfg.keep_checkpoint:
            drop_checkpoint_weights(out)  # 3x the model's size, needed only to train on (--resume --epochs N)
        report.write_pictures_and_card(out, state["log"], metrics, sizes, quality)
    report.optional_output(f"the {cfg.report_to} log", accelerator.log,
                           {f"test_{k}": test[k] for k in ("accuracy", "f1_macro", "loss")}, step=state["step"])
    report.optional_output(f"the {cfg.report_to} log", accelerator.end_training)
    say(report.describe_quality(metrics, sizes["train"]))
    say(f"Test {report.headline(test)} · n={test['n']:,} (best epoch {state['best_epoch']})")
    report.beside_baseline(metrics, run.lengths,  # the model beside the baseline; a warning when not ahead
                           getattr(best_model.config, "max_position_embeddings", None))
    say(f"Model saved to {out / 'best'} — use it with: "
        f"pipeline('text-classification', model='{out / 'best'}'{', top_k=None' * (cfg.problem == 'multi_label')})")
    return metrics


def main(cfg):
    try:
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main(CLI_CONFIG)
