"""What people look at after (and before) a run: token-length statistics, curves.png, confusion.png and the model
card best/README.md. Plain functions over the numbers train.py already has; matplotlib draws without a display."""
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import yaml

from runs import say

LENGTH_SAMPLE = 2000  # texts tokenized for the statistics: enough for the percentiles, quick even for IMDB


def length_stats(texts, tokenizer, max_len, seed=0):
    """Token counts (untruncated) of up to LENGTH_SAMPLE texts: median, p90, p99, max and the share max_len cuts."""
    texts = list(texts)
    if len(texts) > LENGTH_SAMPLE:
        texts = random.Random(seed).sample(texts, LENGTH_SAMPLE)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    return {"n": int(len(lengths)), "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "truncated": float((lengths > max_len).mean()), "max_len": max_len, "lengths": lengths.tolist()}


def describe_lengths(stats, truncation="head"):
    line = (f"Lengths in tokens ({stats['n']:,} training texts): median {stats['median']:.0f} · p90 {stats['p90']:.0f} "
            f"· p99 {stats['p99']:.0f} · max {stats['max']:,} · {stats['truncated']:.0%} cut at --max-len "
            f"{stats['max_len']}")
    if stats["truncated"] > 0.25:
        suggestion = min(512, int(stats["p90"]) // 32 * 32 + 32)  # 512: the limit of most BERT-like models
        kept = np.mean(np.array(stats["lengths"]) <= suggestion)
        line += (f"\nMore than a quarter of the texts are cut: --max-len {suggestion} would keep {kept:.0%} of them "
                 f"whole (at about {suggestion / stats['max_len']:.1f}x the cost per example), if the model allows it")
        if truncation != "head+tail":
            line += "\nOr keep the start and the end of each text, at the same cost: --truncation head+tail"
    return line


def optional_output(what, write, *args, **kwargs):
    """Pictures, the model card, a tracker: never worth a trained model. A failure is one line, and the run goes on
    (the model in best/ and metrics.json are written first)."""
    try:
        write(*args, **kwargs)
    except Exception as e:
        say(f"Could not write {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(the model and metrics.json are saved)", file=sys.stderr)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_lengths(stats, path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(stats["lengths"], bins=50, color="#4c72b0")
    ax.axvline(stats["max_len"], color="#c44e52", linestyle="--", label=f"max_len {stats['max_len']} "
                                                                          f"({stats['truncated']:.0%} cut)")
    ax.set(xlabel="tokens per text", ylabel="texts", title=f"Training text lengths ({stats['n']:,} texts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(log, path):
    """Train loss (per logging interval when there are step rows, else per epoch) and validation accuracy and
    macro-F1 per epoch on the left; the learning rate on a second axis."""
    plt = _pyplot()
    epochs = [r for r in log if r.get("kind", "epoch") == "epoch"]
    steps = [r for r in log if r.get("kind") == "step"] or epochs
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    loss_ax.plot([r["step"] for r in steps], [r["train_loss"] for r in steps], color="#4c72b0", label="train loss")
    loss_ax.set(xlabel="optimizer step", ylabel="train loss", title="Training")
    lr_ax = loss_ax.twinx()
    lr_ax.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="#999999", linestyle=":", label="lr")
    lr_ax.set_ylabel("learning rate (dotted)")
    loss_ax.legend(loc="upper right")
    for key, name, color in (("val_accuracy", "accuracy", "#55a868"), ("val_f1_macro", "macro-F1", "#c44e52")):
        points = [(r["epoch"], r[key]) for r in epochs if key in r]
        if points:
            val_ax.plot(*zip(*points), marker="o", color=color, label=f"validation {name}")
    val_ax.set(xlabel="epoch", ylabel="score", title="Validation")
    val_ax.set_xticks([r["epoch"] for r in epochs])
    scores = [y for line in val_ax.lines for y in line.get_ydata()]
    val_ax.set_ylim(max(0.0, min(scores, default=0.0) - 0.05), 1.005)  # one epoch: no zoom into a single point
    if val_ax.lines:
        val_ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


MANY_CLASSES = 30  # beyond this, no numbers in the cells: a heat map and the most confused pairs instead


def plot_confusion(test, path):
    """Counts in the cells, shading by row share (recall), class names on both axes. With many classes (the
    cells would be unreadable, and drawing N² numbers takes gigabytes) a heat map without cell text and the most
    confused pairs beside it; metrics.json keeps the full matrix."""
    plt = _pyplot()
    counts = np.array(test["confusion_matrix"])
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = test["labels"]
    title = f"Test confusion matrix\nn={test['n']:,} · accuracy {test['accuracy']:.1%}"
    if len(names) > MANY_CLASSES:
        return plot_many_classes(plt, counts, shares, names, title, path)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(counts):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_many_classes(plt, counts, shares, names, title, path, pairs=20):
    errors = counts.copy()
    np.fill_diagonal(errors, 0)
    worst = np.argsort(errors, axis=None)[::-1][:pairs]
    lines = [f"{names[i][:24]} → {names[j][:24]}: {errors[i, j]}" for i, j in zip(*np.unravel_index(worst, errors.shape))
             if errors[i, j] > 0]
    fig, (heat, text) = plt.subplots(1, 2, figsize=(14, 7), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    heat.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    heat.set(xlabel=f"predicted (class index, {len(names):,} classes)", ylabel="true (class index)", title=title)
    text.axis("off")
    text.text(0, 1, "Most confused (true → predicted: count)\n\n" + ("\n".join(lines) or "none"), va="top",
              family="monospace", fontsize=9, transform=text.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def hub_id(source):
    """A Hub id ('distilbert-base-uncased', 'stanfordnlp/imdb') or None for a local path: a card's header names
    only what others can fetch; a local path stays in the card's text."""
    return None if Path(source).expanduser().exists() or Path(source).is_absolute() else source


def model_card(metrics, sizes):
    """best/README.md in the Hugging Face model-card format: YAML header, then what a reader wants to know."""
    cfg, test = metrics["config"], metrics["test"]
    base_model, dataset = hub_id(cfg["model"]), hub_id(cfg["dataset"])
    results = {"task": {"type": "text-classification"},
               "metrics": [{"type": "accuracy", "value": test["accuracy"]},
                           {"type": "f1", "name": "macro-F1", "value": test["f1_macro"]}]}
    if dataset:
        results["dataset"] = {"name": dataset, "type": dataset}
    header = {"library_name": "transformers", "pipeline_tag": "text-classification",
              **({"base_model": base_model} if base_model else {}), **({"datasets": [dataset]} if dataset else {}),
              "metrics": ["accuracy", "f1"], "model-index": [{"name": "text-classifier", "results": [results]}]}
    hyper = {k: cfg[k] for k in ("max_len", "batch_size", "grad_accum", "epochs", "lr", "weight_decay",
                                 "warmup_ratio", "scheduler", "max_grad_norm", "seed")}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# Text classifier fine-tuned from `{cfg['model']}`", "",
             f"Classes: {', '.join(test['labels'])}. Trained with this project's `train.py` on `{cfg['dataset']}`"
             f" ({', '.join(f'{n:,} {split}' for split, n in sizes.items())}); best epoch "
             f"{metrics['best_epoch']} of {cfg['epochs']}, {metrics['precision']}, {metrics['num_processes']} "
             "process(es).", "", "## Results on the test split", "",
             "| metric | value |", "|---|---|", f"| accuracy | {test['accuracy']:.4f} |",
             f"| macro-F1 | {test['f1_macro']:.4f} |", f"| examples | {test['n']:,} |", "",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
              for name, c in test["per_class"].items()]
    lines += ["", "## Training hyperparameters", "", "```json", json.dumps(hyper, indent=2), "```", "",
              "## How to use", "", "```python", "from transformers import pipeline",
              'classify = pipeline("text-classification", model="path/to/this/folder")',
              'classify("Your text here")', "```", ""]
    return "\n".join(lines)


def write_model_card(metrics, sizes, folder):
    card = folder / "README.md.tmp"
    card.write_text(model_card(metrics, sizes))
    os.replace(card, card.with_suffix(""))  # atomic: the old card or the new one, never half of one
