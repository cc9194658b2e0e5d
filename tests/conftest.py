"""Offline fixtures: a tiny DistilBERT checkpoint with a WordPiece vocab written here, and a learnable toy task."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toy import toy_examples, write_csv, write_tiny_model  # noqa: E402 -- after the path is set


@pytest.fixture(scope="session", autouse=True)
def no_step_floor():
    """The tests' tiny runs train the epochs they ask for: the step floor (--min-steps 300) would raise each to dozens
    of epochs, slowing the suite many times over and changing what the tests look at (step rows, resumed epochs).
    Its own tests put back the real one, which this yields. Runs in a subprocess pass --min-steps themselves."""
    import train
    real = train.enough_epochs
    train.enough_epochs = lambda cfg, steps_per_epoch: cfg
    yield real
    train.enough_epochs = real


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Without dropout, so that gradients can be compared exactly."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-distilbert"))


@pytest.fixture(scope="session")
def tiny_model_with_dropout(tmp_path_factory):
    """With dropout, so that a resumed run must also restore the random number generators to match."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-distilbert-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory):
    return str(write_csv(tmp_path_factory.mktemp("data") / "toy.csv", toy_examples(400)))


@pytest.fixture
def fast(tiny_model):
    """Overrides for a quick run of the tiny model: settings where the toy task is learned in seconds."""
    return dict(model=tiny_model, max_len=32, batch_size=16, eval_batch_size=32, epochs=3, lr=3e-3,
                warmup_ratio=0.1, precision="fp32",
                min_steps=0)  # the epochs as given: the step floor (test_baseline.py) would raise them


@pytest.fixture
def crash_at_checkpoint(monkeypatch):
    """crash_at_checkpoint(n, run, half_written=False): run() with the machine dying as it writes its n-th
    checkpoint (SystemExit, which no handler catches), leaving that checkpoint half written or not begun."""
    import train as train_module
    save_state = train_module.Accelerator.save_state

    def crash(n, run, half_written=False):
        calls = []

        def dying_save(self, folder):
            calls.append(folder)
            if len(calls) == n:
                if half_written:
                    folder.mkdir()
                    (folder / "model.safetensors").write_bytes(b"half a file")
                raise SystemExit("killed")
            return save_state(self, folder)
        with monkeypatch.context() as patch, pytest.raises(SystemExit):
            patch.setattr(train_module.Accelerator, "save_state", dying_save)
            run()
    return crash
