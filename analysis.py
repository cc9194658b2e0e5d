"""Is the model good enough? Plain functions over logits, labels and texts (torch and numpy only): the test metrics,
the mistakes, calibration (expected calibration error, temperature scaling), accuracy at a chosen coverage, and the
training examples whose labels the model doubts. train.py gathers the logits; report.py draws and writes the card.

The probabilities people see (errors.jsonl, suspect_labels.jsonl, the coverage thresholds, predict.py) are the
calibrated ones, softmax(logits / T): a threshold from metrics.json then means the same as a score from predict.py.

Multi-label (labels: a 0/1 row per example): micro/macro/samples-F1 and exact match at a threshold on sigmoid
probabilities, the threshold tuned on validation, and the examples whose predicted label set is wrong.

Monitoring: the reference that serve.py compares live texts with (best/monitoring.json), and the population
stability index it compares them by.
"""
import math
import random

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

THRESHOLDS = np.round(np.arange(0.02, 0.99, 0.01), 2)  # where the multi-label threshold is tuned

ECE_BINS = 15  # equal-width bins over the top probability (Guo et al., 2017)
COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.5)  # shares of the test texts the model is most sure of
TEMPERATURE_RANGE = (0.01, 100.0)  # where T is looked for
SUSPECTS = 100  # at most this many suspect labels: the lowest p(given label) first ...
SURE_OF_ANOTHER = 0.6  # ... and only those where the model predicts another class with p >= this: an unsure model
# (scores near 1/classes: a coin's 0.50-0.51 with two) names none; a toy model 93% right gave its 12 mislabeled
# training texts 0.67-0.81 (tests/test_quality.py), so a higher bar would hide real suspects


def classification_metrics(labels, preds, names):
    ids = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1_macro": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion_matrix": confusion_matrix(labels, preds, labels=ids).tolist(),
        "labels": list(names),
        "n": int(len(labels)),
    }


def label_set_metrics(labels, predicted, names):
    """Multi-label metrics from 0/1 arrays (n x K): micro-F1 (every decision counts alike), macro-F1 (every label
    alike), samples-F1 (per text, averaged; a text with no label and none predicted is right), the exact-match
    ratio (the whole set right; also `accuracy`) and per-label precision, recall, F1 and support. A ratio with
    nothing to count (no such label predicted, say) is 0, as scikit-learn's zero_division=0; written out here since
    scikit-learn takes a single label's column for a binary task."""
    truth, predicted = labels.astype(bool), predicted.astype(bool)
    tp, fp, fn = (truth & predicted).sum(0), (~truth & predicted).sum(0), (truth & ~predicted).sum(0)
    ratio = lambda a, b: np.divide(a, b, out=np.zeros(np.shape(a)), where=np.asarray(b) > 0)  # noqa: E731
    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    per_text, sizes = (truth & predicted).sum(1), truth.sum(1) + predicted.sum(1)
    exact = float((truth == predicted).all(1).mean())
    return {"accuracy": exact, "exact_match": exact,
            "f1_micro": float(ratio(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())), "f1_macro": float(f1.mean()),
            "f1_samples": float(np.where(sizes > 0, ratio(2 * per_text, sizes), 1.0).mean()),  # none, none: right
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(truth[:, i].sum())} for i, name in enumerate(names)},
            "labels": list(names), "n": int(len(labels))}


def scores(logits, labels, names, threshold=0.5):
    """classification_metrics plus the mean cross-entropy loss, from a split's logits and labels (tensors); for
    multi-label labels (a 0/1 row each), label_set_metrics at `threshold` plus the mean binary cross-entropy."""
    if labels.ndim == 2:
        metrics = label_set_metrics(labels.int().numpy(), (logits.sigmoid() >= threshold).int().numpy(), names)
        metrics.update(threshold=threshold, loss=float(torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float())))
        return metrics
    metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), names)
    metrics["loss"] = float(torch.nn.functional.cross_entropy(logits, labels))
    return metrics


def tune_threshold(logits, labels):
    """The threshold (of THRESHOLDS) with the best micro-F1 on these (validation) examples; of equals, the one
    nearest 0.5."""
    probs, truth = logits.double().sigmoid(), labels.bool()

    def micro_f1(threshold):
        predicted = probs >= threshold
        return 2 * int((predicted & truth).sum()) / max(int(predicted.sum() + truth.sum()), 1)
    return float(max(THRESHOLDS, key=lambda t: (round(micro_f1(t), 12), -abs(t - 0.5))))


def as_rows(logits, labels, threshold=0.5):
    """(truth, predicted), both n x K bool: one-hot rows for single-label (the likeliest class), the label sets at
    `threshold` for multi-label. Every metric for best is a function of these two."""
    if labels.ndim == 2:
        return labels.bool().numpy(), (logits.sigmoid() >= threshold).numpy()
    eye = np.eye(logits.shape[-1], dtype=bool)
    return eye[labels.numpy()], eye[logits.argmax(-1).numpy()]


def resampled(truth, predicted, metric, weights):
    """`metric` (accuracy: the exact match of the rows; f1_micro; f1_macro) once per row of `weights` (B x n: how
    often each test text is drawn). At weights of 1 it is classification_metrics' or label_set_metrics' figure."""
    if metric == "accuracy":
        return weights @ (truth == predicted).all(1) / weights.sum(1)
    tp, fp, fn = (weights @ (a & b).astype(float) for a, b in
                  ((truth, predicted), (~truth, predicted), (truth, ~predicted)))
    if metric == "f1_micro":
        tp, fp, fn = tp.sum(1), fp.sum(1), fn.sum(1)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(tp.shape), where=2 * tp + fp + fn > 0)
    return f1 if metric == "f1_micro" else f1.mean(1)


def paired_difference(model, reference, metric, resamples=1000, confidence=0.95, seed=0, chunk=100):
    """How sure is "ahead by 0.012"? The model's `metric` minus the baseline's, on the same test texts drawn with
    replacement `resamples` times (a paired bootstrap: both are scored on each draw, so what the two get right
    together cancels out); the percentile interval at `confidence`. `model`, `reference`: as_rows of each."""
    rng, n = np.random.default_rng(seed), len(model[0])
    differences = []
    for start in range(0, resamples, chunk):  # chunks: B x n weights, 100 x 25,000 for IMDB's test split
        draws = min(chunk, resamples - start)
        picks = rng.integers(0, n, (draws, n)) + n * np.arange(draws)[:, None]
        weights = np.bincount(picks.ravel(), minlength=draws * n).reshape(draws, n).astype(float)
        differences.append(resampled(*model, metric, weights) - resampled(*reference, metric, weights))
    low, high = np.quantile(np.concatenate(differences), [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"low": round(float(low), 4), "high": round(float(high), 4), "confidence": confidence,
            "resamples": resamples, "method": "paired bootstrap over the test texts, percentile interval"}


def nll(logits, labels, temperature=1.0, reduction="mean"):
    """Mean negative log-likelihood of the labels under softmax(logits / temperature) (reduction "none": each's)."""
    losses = torch.nn.functional.cross_entropy(logits.double() / temperature, labels, reduction=reduction)
    return float(losses) if reduction == "mean" else losses


def fit_temperature(logits, labels, iterations=100):
    """The one T > 0 that minimizes the NLL of softmax(logits / T) on these (validation) examples, or None when
    there is none: with no mistake among them, the NLL keeps falling as T -> 0 (every example ever surer), so the
    data do not determine T. The NLL is convex in 1/T, so it has a single minimum along log T: a golden-section
    search over log T in TEMPERATURE_RANGE finds it; a search that ends at the range's end (0.01 or 100) found no
    minimum inside it, and is no fit either (None). argmax(logits / T) = argmax(logits): no prediction changes."""
    if not (logits.argmax(-1) != labels).any():
        return None
    logits = logits.double()
    a, b = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    loss = lambda log_t: nll(logits, labels, math.exp(log_t))  # noqa: E731
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    loss_c, loss_d = loss(c), loss(d)
    for _ in range(iterations):  # the bracket shrinks by 0.618 each time: 100 steps leave ~1e-20 of its width
        if loss_c < loss_d:
            b, d, loss_d = d, c, loss_c
            c = b - ratio * (b - a)
            loss_c = loss(c)
        else:
            a, c, loss_c = c, d, loss_d
            d = a + ratio * (b - a)
            loss_d = loss(d)
    if min(abs((a + b) / 2 - math.log(end)) for end in TEMPERATURE_RANGE) < 1e-6:
        return None
    best = math.exp((a + b) / 2)
    return best if nll(logits, labels, best) < nll(logits, labels, 1.0) else 1.0  # never worse than none


def calibrate(logits, labels):
    """(T, None) where these validation examples support a temperature, else (1.0, why not, for the output line and
    metrics.json). A fit on a few examples follows their noise (2 validation texts gave T = 0.02, and scores near 1
    for a model right half the time), so T is kept only when it holds up on examples it was not fitted on: fitted on
    each half of the split (alternate rows: the split is a seeded random sample), it must lower the other half's
    loss (NLL), the two halves together, by more than twice the standard error of that gain. Then T is the fit on
    the whole split."""
    n, wrong = len(labels), int((logits.argmax(-1) != labels).sum())
    if not wrong:
        return 1.0, "no mistake on the validation split, where every lower temperature fits better, without end"
    halves = [torch.arange(start, n, 2) for start in (0, 1)]
    if any(not (logits[half].argmax(-1) != labels[half]).any() for half in halves):
        return 1.0, f"too few validation mistakes ({wrong} in {n} texts) to fit a temperature and check it"
    fits = [fit_temperature(logits[half], labels[half]) for half in halves] + [fit_temperature(logits, labels)]
    if None in fits:
        return 1.0, "the validation split does not determine a temperature (its fit runs to the end of the range, " \
                    f"{TEMPERATURE_RANGE[0]:g} or {TEMPERATURE_RANGE[1]:g})"
    gains = torch.cat([nll(logits[half], labels[half], reduction="none") -
                       nll(logits[half], labels[half], fits[1 - i], reduction="none") for i, half in enumerate(halves)])
    mean, error = float(gains.mean()), float(gains.std() / math.sqrt(n))
    if not mean > 2 * error:
        return 1.0, (f"a temperature fitted on half of the {n} validation texts did not lower the other half's loss "
                     f"beyond chance ({mean:+.3f} ± {error:.3f} nats a text)")
    return fits[2], None


def reliability(probs, labels, bins=ECE_BINS):
    """Per equal-width bin of the top probability ((0, 1/bins], ..., ((bins-1)/bins, 1]): the number of examples,
    their mean top probability and their accuracy (None for an empty bin)."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).double()
    rows = []
    for b in range(bins):
        inside = (confidence > b / bins) & (confidence <= (b + 1) / bins)
        n = int(inside.sum())
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": n,
                     "confidence": float(confidence[inside].double().mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return rows


def ece(probs, labels, bins=ECE_BINS):
    """Expected calibration error: sum over the bins of (share of examples) x |accuracy - mean top probability|."""
    rows = reliability(probs, labels, bins)
    return sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["n"]) / max(len(labels), 1)


def accuracy_at_coverage(probs, labels, coverages=COVERAGES):
    """For each share X: the accuracy on the ceil(X * n) examples with the highest top probability, and the
    threshold: the lowest top probability among them, rounded down to 4 decimals and at least 1e-6 below it, so that
    `predict.py --min-confidence THRESHOLD` keeps every one of them (its probabilities differ in the last bits, from
    other padding), and with them at most the few within 1e-4 below (and ties)."""
    confidence, predicted = probs.max(-1)
    order = torch.sort(confidence, descending=True, stable=True).indices
    correct = (predicted == labels)[order].double()
    table = []
    for share in coverages:
        k = max(1, math.ceil(share * len(labels) - 1e-9))
        table.append({"coverage": share, "accuracy": float(correct[:k].mean()),
                      "threshold": math.floor((float(confidence[order[k - 1]]) - 1e-6) * 1e4) / 1e4, "n": k})
    return table


def coverage_curve(probs, labels):
    """(coverage, accuracy) at every k, most sure first: for the picture."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels)[torch.sort(confidence, descending=True, stable=True).indices].double()
    k = torch.arange(1, len(correct) + 1, dtype=torch.double)
    return (k / len(correct)).tolist(), (correct.cumsum(0) / k).tolist()


def given(text):
    """An example's text for a jsonl row: {"text"}, or a pair's two texts {"text", "text_pair"}."""
    return dict(zip(("text", "text_pair"), text)) if isinstance(text, tuple) else {"text": text}


def row(text, label, probs, names):
    """One jsonl row: the text (see given), its label (true or given), the predicted label with its probability,
    all of them."""
    predicted = int(np.argmax(probs))
    return {**given(text), "label": names[label], "predicted": names[predicted], "score": float(probs[predicted]),
            "p_label": float(probs[label]), "probs": {name: float(p) for name, p in zip(names, probs)}}


def mistakes(probs, labels, texts, names):
    """Every misclassified example, most confidently wrong first (then in the split's order)."""
    confidence, predicted = probs.max(-1)
    wrong = [i for i in torch.sort(confidence, descending=True, stable=True).indices.tolist()
             if predicted[i] != labels[i]]
    return [row(texts[i], int(labels[i]), probs[i].tolist(), names) for i in wrong]


def suspects(probs, labels, texts, names, most=SUSPECTS, sure=SURE_OF_ANOTHER):
    """Training examples whose given label the model finds least likely, lowest p(given label) first, at most
    `most`: only those where it predicts another class with p >= `sure`. Worth a person's look, not proven errors:
    a text the model is merely unsure of (every p below `sure`) is not listed."""
    given = probs.gather(1, labels[:, None])[:, 0]
    top, predicted = probs.max(-1)
    worth_a_look = (predicted != labels) & (top >= sure)
    order = [i for i in torch.sort(given, stable=True).indices.tolist() if worth_a_look[i]]
    return [row(texts[i], int(labels[i]), probs[i].tolist(), names) for i in order[:most]]


def most_confused(matrix, names):
    """{class: (the class it is most often mistaken for, how often, its mistakes in all)} for each class that has
    mistakes, from a confusion matrix (rows: true, columns: predicted)."""
    errors = np.array(matrix)
    np.fill_diagonal(errors, 0)
    return {names[i]: (names[int(errors[i].argmax())], int(errors[i].max()), int(errors[i].sum()))
            for i in range(len(names)) if errors[i].sum()}


def wrong_label_sets(probs, labels, texts, names, threshold):
    """Multi-label errors.jsonl: every test text whose predicted label set is not its true one, the surest wrong
    decision (the probability farthest on the wrong side of the threshold) first."""
    predicted = probs >= threshold
    wrong = predicted != labels.bool()  # each wrong decision
    sureness = torch.where(wrong, (probs - threshold).abs(), torch.zeros_like(probs)).amax(1)
    order = [i for i in torch.sort(sureness, descending=True, stable=True).indices.tolist() if wrong[i].any()]
    label_set = lambda row: [name for name, on in zip(names, row) if on]  # noqa: E731
    return [{**given(texts[i]), "labels": label_set(labels[i].tolist()), "predicted": label_set(predicted[i].tolist()),
             "probs": {name: float(p) for name, p in zip(names, probs[i].tolist())}} for i in order]


def assess_label_sets(test, validation, names, texts, threshold):
    """assess() for multi-label: the threshold tuned on validation (stored in best/config.json, used by predict.py
    and for the test metrics; --threshold without validation), the test metrics at --threshold too, and errors.
    No calibration nor label audit: those are for single-label models."""
    tuned = tune_threshold(*validation) if validation is not None else None
    used = threshold if tuned is None else tuned
    logits, labels = test
    flag = scores(logits, labels, names, threshold)
    additions = {"threshold": used, "threshold_tuned_on": None if tuned is None else "validation",
                 "at_threshold_flag": {k: flag[k] for k in ("threshold", "f1_micro", "f1_macro", "exact_match")}}
    return {"test": additions, "threshold": used, "saved": {"threshold": used}, "suspects": None,
            "mistakes": wrong_label_sets(logits.double().sigmoid(), labels, texts["test"], names, used)}


def assess(test, validation, audit, names, texts, threshold=0.5):
    """All of the above for a finished run. `test`, `validation` (or None: no temperature; nor where it cannot
    support one: see calibrate) and `audit` (or None: no label audit) are (logits, labels) in their split's order;
    `texts` {split: texts}.
    Returns {"test": the additions to metrics' test section, "temperature", "mistakes", "suspects" (None without an
    audit), "reliability": (before, after), "curve", "saved": what goes into best/config.json}. Multi-label labels
    (0/1 rows): assess_label_sets, with `threshold` where there is no validation split to tune it on."""
    if test[1].ndim == 2:
        return assess_label_sets(test, validation, names, texts, threshold)
    temperature, skipped = calibrate(*validation) if validation is not None else \
        (1.0, "no validation split, --val-fraction 0")
    logits, labels = test
    raw, calibrated = logits.double().softmax(-1), (logits.double() / temperature).softmax(-1)
    additions = {"ece": ece(raw, labels), "ece_calibrated": ece(calibrated, labels), "temperature": temperature,
                 "calibrated_on": None if skipped else "validation", "calibration_skipped": skipped,
                 "coverage": accuracy_at_coverage(calibrated, labels)}
    found = None
    if audit is not None:
        audit_probs = (audit[0].double() / temperature).softmax(-1)
        found = suspects(audit_probs, audit[1], texts["train"], names)
    return {"test": additions, "temperature": temperature, "suspects": found, "threshold": None,
            "saved": {"calibration_temperature": temperature},  # into best/config.json: predict.py reads it
            "mistakes": mistakes(calibrated, labels, texts["test"], names),
            "reliability": (reliability(raw, labels), reliability(calibrated, labels)),
            "curve": coverage_curve(calibrated, labels)}


# ----------------------------------------------------------------------------------------------------------------
# Monitoring: what the model saw in training (best/monitoring.json), for serve.py to compare live texts with

MONITORING_SAMPLE = 2000  # training texts tokenized for the length and unknown-token reference
CONFIDENCE_EDGES = [round(x, 1) for x in np.arange(0.1, 1.0, 0.1)]  # the inner edges of 10 bins over [0, 1]


def token_stats(tokenizer, texts):
    """(tokens, unknown tokens) of each text, or (text, pair) tuple: its whole encoding, untruncated, special
    tokens included (so a count above max_len means a text that the model reads cut)."""
    if not texts:
        return [], []
    pairs = isinstance(texts[0], tuple)
    encoded = tokenizer(*zip(*texts) if pairs else (list(texts),), truncation=False, verbose=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    return [len(ids) for ids in encoded], [ids.count(unknown) if unknown is not None else 0 for ids in encoded]


def shares(values, inner_edges):
    """The share of `values` in each bin: (-inf, e0], (e0, e1], ..., (e_last, inf) for the sorted inner edges."""
    counts = np.bincount(np.searchsorted(inner_edges, values, side="left"), minlength=len(inner_edges) + 1)
    return (counts / max(counts.sum(), 1)).tolist()


def psi(expected, actual, floor=1e-4):
    """Population stability index of two distributions over the same bins: sum (a - e) ln(a / e), each share at
    least `floor` (an empty bin would make it infinite). Rule of thumb: < 0.1 stable, 0.1-0.2 some shift, > 0.2 a
    shift worth a look."""
    e, a = np.maximum(np.asarray(expected, float), floor), np.maximum(np.asarray(actual, float), floor)
    return float(((a - e) * np.log(a / e)).sum())


def monitoring_reference(train_labels, test_logits, temperature, train_texts, tokenizer, max_len, names, seed=0):
    """best/monitoring.json: the training label distribution (multi-label: each label's share of texts); on the
    test split, the share of each predicted label (the likeliest) and the histogram of its probability (calibrated
    with `temperature`; None: multi-label, sigmoids), as predict.py gives them; on a sample of the training texts,
    the histogram of token lengths (bins at its deciles), the share cut by max_len and the share of unknown tokens.
    serve.py compares a rolling window of what it serves with these."""
    labels = np.asarray(list(train_labels))
    logits = test_logits.double()
    test_probs = logits.sigmoid() if temperature is None else (logits / temperature).softmax(-1)
    label_share = labels.mean(0) if labels.ndim == 2 else np.bincount(labels, minlength=len(names)) / len(labels)
    confidence, predicted = test_probs.max(-1)
    texts = list(train_texts)
    if len(texts) > MONITORING_SAMPLE:
        texts = random.Random(seed).sample(texts, MONITORING_SAMPLE)
    lengths, unknown = token_stats(tokenizer, texts)
    length_edges = sorted({float(q) for q in np.quantile(lengths, np.arange(0.1, 1.0, 0.1))})
    return {"labels": list(names), "train_label_share": [float(x) for x in label_share],
            "predicted_share": (np.bincount(predicted.numpy(), minlength=len(names)) / len(predicted)).tolist(),
            "confidence_edges": CONFIDENCE_EDGES, "confidence_share": shares(confidence.numpy(), CONFIDENCE_EDGES),
            "length_edges": length_edges, "length_share": shares(lengths, length_edges),
            "truncated_share": float(np.mean(np.array(lengths) > max_len)), "max_len": max_len,
            "unknown_share": sum(unknown) / max(sum(lengths), 1),
            "n": {"train": int(len(labels)), "test": int(len(predicted)), "texts_tokenized": len(texts)}}
