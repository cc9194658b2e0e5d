"""colab.ipynb runs top to bottom, headless and offline: its parameters cell swapped for the tiny model and toy data."""
import re

import nbformat
import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "colab.ipynb"


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def test_notebook_is_valid_and_holds_no_pasted_script():
    nb = read_notebook()
    nbformat.validate(nb)
    assert not any("def train(" in cell.source for cell in nb.cells)  # it imports train.py, never copies it
    source = parameters_cell(nb).source
    for name in ("REPO_URL", "PRESET", "OVERRIDES", "OFFLINE_TEST"):
        assert f"{name} = " in source
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")  # shipped clean


def run_notebook(overrides):
    """(outputs of every code cell, their printed text and plain-text results) of the notebook run with these
    overrides in its parameters cell, offline and in place."""
    nbclient = pytest.importorskip("nbclient")
    nb = read_notebook()
    parameters_cell(nb).source = (f'REPO_URL = ""\nPRESET = "imdb"\nOVERRIDES = {overrides!r}\n'
                                  "OFFLINE_TEST = True")
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(ROOT)}}).execute()  # raises on a failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    text += "".join(out.data.get("text/plain", "") for out in outputs if "data" in out)
    return outputs, text


def pictures(outputs):
    return sum("image/png" in out.data for out in outputs if out.output_type == "display_data")


def test_notebook_runs_offline(tmp_path, fast, toy_csv):
    # 3 epochs: 2 do not learn it
    outputs, text = run_notebook(dict(fast, dataset=toy_csv, output_dir=str(tmp_path / "run")))
    assert pictures(outputs) >= 2
    accuracy = re.search(r"Test accuracy ([\d.]+) · macro-F1 [\d.]+ · n=\d+ · run folder (.+)", text)
    assert accuracy and float(accuracy[1]) >= 0.9 and accuracy[2] == str(tmp_path / "run")  # chance is 0.5
    assert "Project folder: " + str(ROOT) in text  # the files were found in place: no clone, no upload
    # predict() and the pipeline both classify the example sentences (good, bad, good) with the toy task's names
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("pos  ", "neg  "))]
    assert [words[0] for words in lines] == ["pos", "neg", "pos"]
    assert "great fun from start to end." in text
    labels = [out.data["text/plain"] for out in outputs if out.output_type == "execute_result"][-1]
    assert labels.count("'label': 'pos'") == 2 and labels.count("'label': 'neg'") == 1


def test_notebook_runs_a_multi_label_run(tmp_path, tiny_model):
    """A multi-label run writes per_label.png, not confusion.png nor calibration.png: the results cell shows what
    the run wrote and its scores of label sets, and the sentences get label sets (the tiny model's, maybe empty)."""
    from test_multi_label import write_jsonl
    from toy import toy_label_sets
    outputs, text = run_notebook(dict(model=tiny_model, dataset=write_jsonl(tmp_path / "sets.jsonl",
                                      toy_label_sets(120)), max_len=24, epochs=1, precision="fp32",
                                      output_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run" / "confusion.png").exists() and (tmp_path / "run" / "per_label.png").exists()
    assert pictures(outputs) == 2  # curves.png, per_label.png
    assert re.search(r"Test micro-F1 [\d.]+ · exact match [\d.]+ · macro-F1 [\d.]+ · n=\d+ · run folder ", text)
    assert "great fun from start to end." in text
