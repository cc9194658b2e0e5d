"""The obvious baseline every run is measured against: "better than what?". TF-IDF features of words and word
bigrams with a logistic regression (scikit-learn; one per label for multi-label; for text pairs the two texts'
features side by side and their product, which is where a linear model sees what the two share), fitted on the
run's own training split, its regularization and (multi-label) threshold chosen on the run's validation split,
scored on the run's test split with the functions that score the model (analysis.scores, analysis.tune_threshold).

Seconds on a few thousand texts; train.py runs it before training when the splits' texts hold at most
BASELINE_LIMIT characters (config.py; the demo's BBC news: 4.7M, about 7 s here), and metrics.json keeps it under
"baseline"."""
import time

import numpy as np
import scipy.sparse
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from analysis import scores, tune_threshold
from config import BASELINE_LIMIT
from data import model_inputs
from runs import say

NAME = "TF-IDF + logistic regression"
MAX_FEATURES = 50_000  # the most frequent words and word pairs: the features, and the time, capped
STRENGTHS = (1.0, 10.0, 100.0)  # logistic regression's C (inverse regularization) tried; the best on validation wins
PROBABILITY_FLOOR = 1e-7  # probabilities are kept in [floor, 1 - floor] before their logs become logits


def features():
    """Word 1- and 2-grams, TF-IDF with sublinear counts. Character n-grams were measured too (char_wb 3-5, 20,000
    more features): on the demo's BBC news 22.5 s instead of 4.7 s, for the same test accuracy (AMD EPYC Zen 4, 2
    cores); docs/quality.md."""
    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=MAX_FEATURES, dtype=np.float32)


def vectorize(vectorizer, texts, fit=False):
    """A split's feature rows; for pairs (text, pair) the first's, the second's and their product, side by side."""
    pairs = isinstance(texts[0], tuple)
    if fit:
        vectorizer.fit([side for pair in texts for side in pair] if pairs else texts)
    if not pairs:
        return vectorizer.transform(texts)
    first, second = (vectorizer.transform(list(side)) for side in zip(*texts))
    return scipy.sparse.hstack([first, second, first.multiply(second)]).tocsr()


def classifier(strength, multi_label):
    model = LogisticRegression(C=strength, max_iter=1000)
    return OneVsRestClassifier(model) if multi_label else model


def as_logits(model, rows, n_labels, multi_label):
    """The model's probabilities as logits (log-odds per label; log-probabilities per class), so that the model's
    own metric functions score them: sigmoid and softmax turn them back into the same probabilities."""
    probs = np.full((rows.shape[0], n_labels), PROBABILITY_FLOOR)
    if multi_label:
        probs = model.predict_proba(rows)  # a label without positives in training: probability 0
    else:
        probs[:, model.classes_] = model.predict_proba(rows)  # every class has training examples; to be sure
    probs = torch.as_tensor(np.clip(probs, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR), dtype=torch.float64)
    return (probs.log() - (-probs).log1p() if multi_label else probs.log()).float()


def run(data, names, metric, threshold=0.5):
    """Fit on data["train"], choose C (and the multi-label threshold) on data["validation"] when there is one (by
    `metric`, the run's metric for best), score on data["test"]: (the test metrics, "seconds", "model"; the test
    logits, for analysis.paired_difference)."""
    started = time.time()
    labels = {split: torch.as_tensor(examples["label"]) for split, examples in data.items()}
    multi_label = labels["train"].ndim == 2
    vectorizer = features()
    rows = {"train": vectorize(vectorizer, model_inputs(data["train"]), fit=True)}
    rows.update({split: vectorize(vectorizer, model_inputs(data[split])) for split in data if split != "train"})
    tried = []
    for strength in STRENGTHS if "validation" in data else STRENGTHS[1:2]:
        model = classifier(strength, multi_label).fit(rows["train"], labels["train"].numpy())
        val = as_logits(model, rows["validation"], len(names), multi_label) if "validation" in data else None
        tuned = tune_threshold(val, labels["validation"]) if multi_label and val is not None else threshold
        score = scores(val, labels["validation"], names, tuned)[metric] if val is not None else 0.0
        tried.append((score, -strength, model, tuned))  # of equal scores, the stronger regularization
    _, minus_strength, model, tuned = max(tried, key=lambda t: t[:2])
    logits = as_logits(model, rows["test"], len(names), multi_label)
    test = scores(logits, labels["test"], names, tuned)
    return {**test, "C": -minus_strength, "seconds": round(time.time() - started, 2), "model": NAME}, logits


def characters(data):
    """The characters of text in all splits (a pair's two texts both): what the baseline's time follows."""
    return sum(len(text) for examples in data.values() for column in ("text", "text_pair")
               if column in examples.column_names for text in examples[column])


def for_run(cfg, data, names):
    """(the baseline's test metrics, None, its test logits), or (None, why there are none, None): --no-baseline, or
    more than BASELINE_LIMIT characters of text, where it would cost more than a small share of the run."""
    if not cfg.baseline:
        return None, "--no-baseline", None
    size = characters(data)
    if size > BASELINE_LIMIT:
        return None, f"{size:,} characters of text, above the {BASELINE_LIMIT:,} it is fitted on", None
    result, logits = run(data, names, cfg.metric_for_best, cfg.threshold)
    say(f"Baseline: {NAME} fitted on the same training split in {result['seconds']:.1f}s (C {result['C']:g}, "
        "chosen on validation); its test scores come beside the model's at the end")
    return result, None, logits
