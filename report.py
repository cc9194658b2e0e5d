"""What people look at after (and before) a run: token-length statistics, curves.png, confusion.png,
calibration.png (multi-label: per_label.png instead of those two) and the model card best/README.md. Plain
functions over the numbers train.py and analysis.py already have; matplotlib draws without a display."""
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import yaml

from analysis import ECE_BINS, SURE_OF_ANOTHER, SUSPECTS, most_confused
from config import AUDIT_LIMIT
from runs import say

LENGTH_SAMPLE = 2000  # texts tokenized for the statistics: enough for the percentiles, quick even for IMDB


def length_stats(texts, tokenizer, max_len, seed=0):
    """Token counts (untruncated) of up to LENGTH_SAMPLE texts: median, p90, p99, max and the share max_len cuts.
    Texts may be (text, pair) tuples: a pair's count is that of its pair encoding, both texts and the special tokens."""
    texts = list(texts)
    if len(texts) > LENGTH_SAMPLE:
        texts = random.Random(seed).sample(texts, LENGTH_SAMPLE)
    lengths = np.array([len(ids) for ids in tokenizer(texts, truncation=False, verbose=False)["input_ids"]])
    return {"n": int(len(lengths)), "median": float(np.median(lengths)), "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)), "max": int(lengths.max()),
            "truncated": float((lengths > max_len).mean()), "max_len": max_len, "lengths": lengths.tolist(),
            "pairs": isinstance(texts[0], tuple)}


def describe_lengths(stats, truncation="head"):
    line = (f"Lengths in tokens ({stats['n']:,} training {'pairs' if stats['pairs'] else 'texts'}): median "
            f"{stats['median']:.0f} · p90 {stats['p90']:.0f} · p99 {stats['p99']:.0f} · max {stats['max']:,} · "
            f"{stats['truncated']:.0%} cut at --max-len {stats['max_len']}")
    if stats["truncated"] > 0.25:
        suggestion = min(512, int(stats["p90"]) // 32 * 32 + 32)  # 512: the limit of most BERT-like models
        if suggestion > stats["max_len"]:  # never a "longer" length that is the one in use, or shorter
            kept = np.mean(np.array(stats["lengths"]) <= suggestion)
            line += (f"\nMore than a quarter of the texts are cut: --max-len {suggestion} would keep {kept:.0%} of "
                     f"them whole (at about {suggestion / stats['max_len']:.1f}x the cost per example), if the model "
                     "allows it")
        if truncation != "head+tail" and not stats["pairs"]:  # a pair is cut longest_first, never head+tail
            line += ("\nOr keep" if suggestion > stats["max_len"] else "\nMore than a quarter of the texts are cut: "
                     "keep") + " the start and the end of each text, at the same cost: --truncation head+tail"
    return line


def new_weights(info, prefix, outputs, model):
    """The weights from_pretrained did not find in the checkpoint: the new classification head, as expected; and a
    warning for any of the encoder (its name begins with `prefix`): the checkpoint does not match the architecture."""
    new = sorted(info["missing_keys"]) + sorted(key for key, *_ in info["mismatched_keys"])
    head, body = [k for k in new if not k.startswith(prefix)], [k for k in new if k.startswith(prefix)]
    if head:
        say(f"New classification head ({', '.join(sorted({k.rsplit('.', 1)[0] for k in head}))}) for "
            f"{outputs}, randomly initialized: this is what fine-tuning trains")
    if body:
        say(f"Warning: {len(body)} weight(s) of the encoder were not in {model} and start random: "
            f"{', '.join(body[:4])}{'...' if len(body) > 4 else ''}", file=sys.stderr)


def headline(metrics):
    """A split's main scores in a line: accuracy and macro-F1; multi-label: micro-F1, exact match and macro-F1."""
    line = f"accuracy {metrics['accuracy']:.4f}"
    if "exact_match" in metrics:
        line = f"micro-F1 {metrics['f1_micro']:.4f} · exact match {metrics['exact_match']:.4f}"
    return f"{line} · macro-F1 {metrics['f1_macro']:.4f}"


METRIC_NAMES = {"accuracy": "accuracy", "f1_macro": "macro-F1", "f1_micro": "micro-F1"}


def metric_name(metrics, key):
    """How a metric for best is called in a line: multi-label accuracy is the exact match."""
    return "exact match" if key == "accuracy" and "exact_match" in metrics["test"] else METRIC_NAMES[key]


def beside_baseline(metrics, lengths=None, positions=None):
    """The model's test score on its metric for best beside the baseline's (baseline.py), or why there is none;
    a plain warning, with what to try, when the model does not beat it: a longer --max-len only where `lengths`
    (length_stats) says texts were cut and the model reads more than max_len (`positions`, None: unknown)."""
    reference, key, cfg = metrics["baseline"], metrics["config"]["metric_for_best"], metrics["config"]
    if reference is None:
        if metrics["baseline_skipped"] != "--no-baseline":
            say(f"Baseline skipped: {metrics['baseline_skipped']} (see --baseline)")
        return
    model, base, name = metrics["test"][key], reference[key], metric_name(metrics, key)
    standing = "level with it" if model == base else \
        f"{'ahead by' if model > base else 'behind by'} {abs(model - base):.4f}"
    say(f"Test {name} {model:.4f} · baseline ({reference['model']}) {base:.4f} · {standing}"
        + how_sure(reference, metrics["test"]))
    if model < base or model == base < 1:  # both perfect: nothing to try
        say(f"Warning: the model does not beat the {reference['model']} baseline on test {name} ({model:.4f} vs "
            f"{base:.4f}). Try more epochs (--epochs {2 * cfg['epochs']} --patience 2), a higher --lr (now "
            f"{cfg['lr']:g})" + (f", a longer --max-len (now {cfg['max_len']}, which cuts {lengths['truncated']:.0%} "
                                 "of the training texts)" if lengths and lengths["truncated"] > 0
                                 and (positions or float("inf")) > cfg["max_len"] else ""), file=sys.stderr)


def how_sure(reference, test):
    """The paired bootstrap interval of model minus baseline (analysis.paired_difference) in words: an interval
    that holds 0 is a difference these test texts cannot tell from the noise. "" where there is none."""
    difference, n = reference.get("difference"), test.get("n")
    if difference is None:
        return ""
    low, high = difference["low"], difference["high"]
    verdict = "clearly ahead" if low > 0 else "clearly behind" if high < 0 else "within the noise"
    return (f" ({difference['confidence']:.0%} interval {low:+.4f} to {high:+.4f} over {n:,} test texts, paired "
            f"bootstrap: {verdict})")


def describe_quality(metrics, n_train):
    """The lines after the test: the mistakes, calibration, accuracy at 90% coverage, and the label audit."""
    test, audit = metrics["test"], metrics["audit"]
    if "exact_match" in test:
        return describe_label_sets(test)
    wrong = test["n"] - sum(np.diag(test["confusion_matrix"]))
    at_90 = next(c for c in test["coverage"] if c["coverage"] == 0.9)
    calibrated = (f"{test['ece_calibrated']:.3f} with temperature {test['temperature']:.2f} (fitted on validation)"
                  if test["calibrated_on"] else f"(no temperature scaling: {why_uncalibrated(metrics)})")
    lines = [f"Mistakes: {wrong:,} of {test['n']:,} test texts → errors.jsonl · calibration error (ECE) "
             f"{test['ece']:.3f} → {calibrated} · at 90% coverage {at_90['accuracy']:.1%} accurate, threshold "
             f"{at_90['threshold']:.4g}"]
    if audit:
        lines.append(f"Label audit: {audit['suspects']:,} of {audit['n']:,} training labels look doubtful to the model "
                     f"→ suspect_labels.jsonl (candidates to re-check, not proven errors) · "
                     f"{metrics['timing']['audit_seconds']:.0f}s")
    elif metrics["config"]["audit"]:
        lines.append(f"Label audit skipped: {n_train:,} training examples (it runs below {AUDIT_LIMIT:,})")
    return "\n".join(lines)


def describe_label_sets(test):
    """Multi-label: the wrong label sets and the threshold (tuned on validation, or --threshold)."""
    flag = test["at_threshold_flag"]
    tuned = (f"tuned on validation; at --threshold {flag['threshold']:g}: micro-F1 {flag['f1_micro']:.4f}"
             if test["threshold_tuned_on"] else "--threshold: no validation split to tune it on")
    wrong = round(test["n"] * (1 - test["exact_match"]))
    return (f"Wrong label sets: {wrong:,} of {test['n']:,} test texts → errors.jsonl · threshold "
            f"{test['threshold']:.2f} ({tuned}); stored in best/config.json for predict.py")


def why_uncalibrated(metrics):
    if metrics["test"].get("calibration_skipped"):  # analysis.calibrate's reason
        return metrics["test"]["calibration_skipped"]
    return ("no validation split, --val-fraction 0" if metrics["val"] is None else
            "no mistake on the validation split, where every lower temperature fits better, without end")


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
    sets = any("val_f1_micro" in r for r in epochs)  # multi-label: micro-F1 too, and accuracy is the exact match
    for key, name, color in (("val_f1_micro", "micro-F1", "#8172b2"), ("val_accuracy", "exact match" if sets else
                             "accuracy", "#55a868"), ("val_f1_macro", "macro-F1", "#c44e52")):
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


def plot_per_label(test, path, most=40):
    """Multi-label: each label's precision, recall and F1 on the test split (the `most` most frequent labels)."""
    plt = _pyplot()
    per = sorted(test["per_class"].items(), key=lambda item: -item[1]["support"])[:most][::-1]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(per) + 1.5)), dpi=100)
    rows = np.arange(len(per))
    ax.barh(rows, [c["f1"] for _, c in per], color="#4c72b0", label="F1")
    ax.plot([c["precision"] for _, c in per], rows, "o", color="#55a868", label="precision")
    ax.plot([c["recall"] for _, c in per], rows, "x", color="#c44e52", label="recall")
    ax.set_yticks(rows, [f"{name[:30]} ({c['support']:,})" for name, c in per])
    ax.set(xlim=(0, 1.02), xlabel=f"on the test split, threshold {test['threshold']:.2f}",
           title=f"Per label (test examples with it) · n={test['n']:,} · micro-F1 {test['f1_micro']:.3f}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_calibration(quality, path):
    """Left: the reliability diagram of the test split (accuracy against mean top probability per bin) before and
    after temperature scaling. Right: accuracy on the share of test texts the model is most sure of."""
    plt = _pyplot()
    test = quality["test"]
    fig, (rel_ax, cov_ax) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    rel_ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="perfectly calibrated")
    for rows, name, color in zip(quality["reliability"], (f"as trained: ECE {test['ece']:.3f}",
                                 f"T = {test['temperature']:.2f}: ECE {test['ece_calibrated']:.3f}"),
                                 ("#c44e52", "#4c72b0")):
        filled = [r for r in rows if r["n"]]
        x, y = [r["confidence"] for r in filled], [r["accuracy"] for r in filled]
        rel_ax.plot(x, y, color=color, alpha=0.4, linewidth=1)
        rel_ax.scatter(x, y, s=[15 + 400 * r["n"] / test["coverage"][0]["n"] for r in filled], color=color, label=name)
    rel_ax.set(xlabel=f"top probability (mean per bin, {ECE_BINS} bins)", ylabel="accuracy", xlim=(0, 1.02),
               ylim=(-0.02, 1.02), title="Reliability on the test split (dot size: share of the texts)")
    for handle in rel_ax.legend(loc="upper left").legend_handles[1:]:
        handle.set_sizes([40])  # not the first bin's size
    coverage, accuracy = quality["curve"]
    cov_ax.plot(coverage, accuracy, color="#55a868")
    points = test["coverage"]
    cov_ax.plot([p["coverage"] for p in points], [p["accuracy"] for p in points], "o", color="#55a868")
    table = [f"{p['coverage']:>8.0%}  {p['accuracy']:>8.1%}  {p['threshold']:>9.3f}" for p in points]
    cov_ax.text(0.03, 0.04, "\n".join(["coverage  accuracy  threshold"] + table), family="monospace", fontsize=8,
                transform=cov_ax.transAxes, va="bottom", bbox=dict(facecolor="white", alpha=0.8))
    cov_ax.set(xlabel="coverage: share of test texts kept, most sure first", ylabel="accuracy on them",
               xlim=(0, 1.02), ylim=(max(0.0, min(accuracy) - 0.05), 1.01), title="Accuracy at coverage")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_pictures_and_card(out, log, metrics, sizes, quality):
    """The nice-to-have outputs, each on its own (optional_output): curves, confusion, calibration, model card."""
    optional_output("curves.png", plot_curves, log, out / "curves.png")
    if "exact_match" in metrics["test"]:  # multi-label: no K x K confusion, no calibration (single-label notions)
        optional_output("per_label.png", plot_per_label, metrics["test"], out / "per_label.png")
    else:
        optional_output("confusion.png", plot_confusion, metrics["test"], out / "confusion.png")
        optional_output("calibration.png", plot_calibration, quality, out / "calibration.png")
    optional_output("best/README.md (the model card)", write_model_card, metrics, sizes, out / "best",
                    quality["mistakes"])


def hub_id(source):
    """A Hub id ('distilbert-base-uncased', 'stanfordnlp/imdb') or None for a local path: a card's header names
    only what others can fetch; a local path stays in the card's text."""
    return None if Path(source).expanduser().exists() or Path(source).is_absolute() else source


def shorten(text, most=80):
    """A text for one cell of a Markdown table: on one line, no column breaks, at most `most` characters."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= most else text[:most - 1].rstrip() + "…"


def better_than_what(metrics):
    """The card's line on the baseline (baseline.py): its score on the metric for best beside the model's."""
    reference, key = metrics.get("baseline"), metrics["config"]["metric_for_best"]
    if reference is None:
        return f"**Better than what?** No baseline was fitted ({metrics.get('baseline_skipped') or 'not recorded'})."
    model, base, name = metrics["test"][key], reference[key], metric_name(metrics, key)
    verdict = f"ahead by {model - base:.4f}" if model > base else \
        "**it does not beat the baseline**: more epochs, a higher lr or a longer max_len may"
    return (f"**Better than what?** {reference['model']} (scikit-learn), fitted on the same training split in "
            f"{reference['seconds']:.1f} s, scores test {name} {base:.4f} on the same test split; this model "
            f"{model:.4f}, {verdict}{how_sure(reference, metrics['test'])}.")


def good_enough(metrics, mistakes, shown=10):
    """The card's "Is it good enough?" section: accuracy at coverage, calibration, the most confident mistakes, what
    each class is mistaken for, and the label audit."""
    test, audit = metrics["test"], metrics.get("audit")
    at_90 = next(c for c in test["coverage"] if c["coverage"] == 0.9)
    lines = ["## Is it good enough?", "", "**Accuracy at coverage.** When the model may abstain on the texts it is "
             "least sure of: the accuracy on the share of test texts with the highest top probability, and that "
             "share's threshold (the lowest top probability kept: `predict.py --min-confidence THRESHOLD` abstains "
             f"below it). At 90% coverage: {at_90['accuracy']:.1%} accurate, threshold {at_90['threshold']:.4g}.", "",
             "| coverage | accuracy | threshold | texts |", "|---|---|---|---|"]
    lines += [f"| {c['coverage']:.0%} | {c['accuracy']:.1%} | {c['threshold']:.4f} | {c['n']:,} |"
              for c in test["coverage"]]
    if test["calibrated_on"]:
        calibration = (f"Temperature scaling fitted on the validation split (T = {test['temperature']:.3f}, stored in "
                       "`config.json` as `calibration_temperature`) brings it to "
                       f"{test['ece_calibrated']:.4f}; predictions do not change. `predict.py` divides the logits by "
                       "T; a plain `pipeline` does not: the same labels, uncalibrated scores.")
    else:
        calibration = f"No temperature scaling (T = 1): {why_uncalibrated(metrics)}."
    lines += ["", f"**Calibration.** Expected calibration error (ECE, {ECE_BINS} equal-width bins of the top "
              f"probability) on the test split as trained: {test['ece']:.4f}. {calibration} The scores and "
              "thresholds in this section are the calibrated ones.", ""]
    wrong = test["n"] - sum(np.diag(test["confusion_matrix"]))
    lines += [f"**Mistakes.** {wrong:,} of {test['n']:,} test texts are misclassified; all of them are in the run's "
              "`errors.jsonl`, most confidently wrong first."]
    if mistakes:
        lines += ["", f"The {min(shown, len(mistakes))} most confident mistakes:", "",
                  "| text | true | predicted | score |", "|---|---|---|---|"]
        lines += [f"| {shorten(m['text'])} | {m['label']} | {m['predicted']} | {m['score']:.3f} |"
                  for m in mistakes[:shown]]
    confused = sorted(most_confused(test["confusion_matrix"], test["labels"]).items(), key=lambda c: -c[1][2])
    if confused:
        lines += ["", "What each class is most often mistaken for (the classes with the most mistakes first):", "",
                  "| true class | mistaken most often for | times | its mistakes |", "|---|---|---|---|"]
        lines += [f"| {name} | {other} | {count} | {total} |" for name, (other, count, total) in
                  confused[:MANY_CLASSES]]
    if audit:
        lines += ["", f"**Suspect labels.** After training, the model read its {audit['n']:,} training examples "
                  f"again: for {audit['suspects']:,} it is sure ({SURE_OF_ANOTHER:.0%} or more) of another class "
                  "than the given one "
                  f"(at most {SUSPECTS}, the least likely first, in the run's `suspect_labels.jsonl`). These are "
                  "candidates to re-check by hand, not proven errors: the model may be the one that is wrong."]
    return lines


def model_card(metrics, sizes, mistakes=(), pairs=False, lora=None):
    """best/README.md in the Hugging Face model-card format: YAML header, then what a reader wants to know. `pairs`:
    the model reads text pairs (its usage example passes two texts); `lora`: adapter/'s adapter_config.json."""
    cfg, test = metrics["config"], metrics["test"]
    base_model, dataset = hub_id(cfg["model"]), hub_id(cfg["dataset"])
    sets = "exact_match" in test  # multi-label
    example = '{"text": "The first text", "text_pair": "The second text"}' if pairs else '"Your text here"'
    named = [("micro-F1", "f1", "f1_micro"), ("macro-F1", "f1", "f1_macro"), ("samples-F1", "f1", "f1_samples"),
             ("exact match", "accuracy", "exact_match")] if sets else \
        [("accuracy", "accuracy", "accuracy"), ("macro-F1", "f1", "f1_macro")]
    results = {"task": {"type": "text-classification"},
               "metrics": [{"type": kind, "name": name, "value": test[key]} for name, kind, key in named]}
    if dataset:
        results["dataset"] = {"name": dataset, "type": dataset}
    header = {"library_name": "transformers", "pipeline_tag": "text-classification",
              **({"base_model": base_model} if base_model else {}), **({"datasets": [dataset]} if dataset else {}),
              "metrics": ["accuracy", "f1"], "model-index": [{"name": "text-classifier", "results": [results]}]}
    hyper = {k: cfg[k] for k in ("max_len", "batch_size", "grad_accum", "epochs", "lr", "weight_decay",
                                 "warmup_ratio", "scheduler", "max_grad_norm", "seed")
             + (("lora_r", "lora_alpha", "lora_dropout", "lora_targets") if lora else ())}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# Text classifier fine-tuned from `{cfg['model']}`", "",
             (f"Labels (multi-label: any number per text, each predicted at probability ≥ {test['threshold']:.2f}, "
              "`threshold` in config.json, tuned on validation where there was one): " if sets else "Classes: ") +
             f"{', '.join(test['labels'])}. Trained with this project's `train.py` on `{cfg['dataset']}`"
             f" ({', '.join(f'{n:,} {split}' for split, n in sizes.items())}); best epoch "
             f"{metrics['best_epoch']} of {cfg['epochs']}, {metrics['precision']}, {metrics['num_processes']} "
             "process(es)." + (lora_sentence(lora) if lora else ""), "", "## Results on the test split", "",
             "| metric | value |", "|---|---|", *(f"| {name} | {test[key]:.4f} |" for name, _, key in named),
             f"| examples | {test['n']:,} |", "",
             f"| {'label' if sets else 'class'} | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
              for name, c in test["per_class"].items()]
    lines += ["", better_than_what(metrics)]
    if "coverage" in test:
        lines += [""] + good_enough(metrics, mistakes)
    lines += ["", "## Training hyperparameters", "", "```json", json.dumps(hyper, indent=2), "```", "",
              "## How to use", "", "```python", "from transformers import pipeline",
              'classify = pipeline("text-classification", model="path/to/this/folder"' +
              (", top_k=None)  # every label's probability" if sets else ")"),
              f'[r["label"] for r in classify([{example}])[0] if r["score"] >= {test["threshold"]:.2f}]' if sets
              else f"classify({example})", "```", ""]
    return "\n".join(lines)


def lora_sentence(lora):
    """What LoRA trained, from the adapter's own config (its targets: peft's resolved layer names, shortened)."""
    layers = sorted({name.rsplit(".", 1)[-1] for name in lora["target_modules"]} - set(lora["modules_to_save"]))
    return (f" Fine-tuned with LoRA (r={lora['r']}, alpha {lora['lora_alpha']}, dropout {lora['lora_dropout']}) on "
            f"the layers {', '.join(layers)}, the classification head trained in full. The LoRA updates are merged "
            "into this model's weights; `adapter/` holds them alone (peft), for use on the base model.")


def write_model_card(metrics, sizes, folder, mistakes=()):
    card = folder / "README.md.tmp"
    pairs = json.loads((folder / "config.json").read_text()).get("text_pair", False)  # the model reads pairs
    adapter = folder / "adapter" / "adapter_config.json"  # a LoRA run's
    lora = json.loads(adapter.read_text()) if adapter.is_file() else None
    card.write_text(model_card(metrics, sizes, mistakes, pairs, lora))
    os.replace(card, card.with_suffix(""))  # atomic: the old card or the new one, never half of one
