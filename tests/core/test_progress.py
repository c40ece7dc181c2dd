"""Long steps report progress on stderr: lines when it is not a terminal, nothing when off."""

from __future__ import annotations

import re

import pytest

from grnx_core import progress


@pytest.fixture
def progress_on():
    previous = progress.set_enabled(True)
    yield
    progress.set_enabled(previous)


def test_off_by_default_outside_grnx_run(capsys, monkeypatch):
    monkeypatch.delenv("GRNX_PROGRESS", raising=False)
    assert list(progress.progress(range(3), desc="step")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_environment_variable_turns_it_on(monkeypatch):
    monkeypatch.setenv("GRNX_PROGRESS", "1")
    assert progress.enabled()
    monkeypatch.setenv("GRNX_PROGRESS", "0")
    assert not progress.enabled()


def test_lines_give_count_total_rate_time_left_and_reported_values(capsys, progress_on):
    with progress.progress(total=10, desc="train epoch 1/2", unit="cell", log_every_s=0.0) as bar:
        bar.update(4, loss=0.5)
        bar.update(6, loss=0.25)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3  # two updates and the end
    assert re.search(r"train epoch 1/2: 4/10 cells, .* cells/s, about .* left, loss 0.5$", lines[0])
    assert re.search(r"10/10 cells, .* done in .* s, loss 0.25$", lines[-1])


def test_lines_are_rate_limited(capsys, progress_on):
    for _ in progress.progress(range(1000), desc="hashing", unit="cell", log_every_s=3600):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[-1]] and "1000/1000 cells" in lines[-1] and "done in" in lines[-1]


def test_training_reports_epochs_and_cells(capsys, progress_on):
    import numpy as np
    import torch

    from grnx_core.recipe import TrainSettings
    from grnx_plugins.models._training import BatchResult, Task, train

    class Regression(Task):
        def __init__(self):
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(64, 3, generator=generator)
            self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])

        def batch(self, module, indices, training):
            rows = torch.as_tensor(indices)
            loss = torch.nn.functional.mse_loss(module(self.x[rows]).squeeze(-1), self.y[rows])
            return BatchResult(loss=loss, n_items=len(indices))

    config = TrainSettings(epochs=2, batch_size=16, learning_rate=0.01)
    train(
        torch.nn.Linear(3, 1),
        Regression(),
        train_idx=np.arange(64),
        val_idx=np.zeros(0, dtype=np.int64),
        config=config,
        context=None,
        rng=np.random.default_rng(0),
        device=torch.device("cpu"),
    )
    err = capsys.readouterr().err
    assert "train epoch 1/2: 64/64 cells" in err and "train epoch 2/2: 64/64 cells" in err
    assert re.search(r"train: 2/2 epochs, .*done in .*loss \d", err)
