"""Data-parallel training: two CPU processes (torchrun, gloo) against one process on the same cells.

DistributedDataParallel averages the gradients of its processes, so two processes with
``batch_size: 4`` take the optimiser steps of one process with ``batch_size: 8``: the loop draws
each step's 8 cells from the same seeded order on every process and splits them (4 + 4; the last
step of 41 training cells has 1 cell, so one process runs a piece weighted 0). The weights, the
training loss and the validation metrics (gathered over both processes) must equal the
single-process run's, within float rounding (the two halves are summed in another order). No
dropout there: a process's dropout draws depend on which cells it holds. Only the main process may
write checkpoints and log metrics. A run killed between checkpoints resumes, on two processes, to
the weights of an uninterrupted two-process run, dropout included (each process's random state is
in the checkpoint). A NaN loss on one process stops both, with one message.

This file is also the script each process runs: ``python -m torch.distributed.run --standalone
--nproc_per_node 2 tests/plugins/models/test_training_ddp.py OUT_DIR`` writes ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from grnx_plugins.models._training import BatchResult, Task

N_CELLS, N_GENES = 51, 6  # validation_fraction 0.2 leaves 41 training cells (5 x 8 + 1) and 10 for validation
MLP_PARAMS = {"hidden_sizes": [8], "l1": 0.001}  # l1 reads the model's layers through the DDP wrapper
SETTINGS = {
    "epochs": 3,
    "learning_rate": 0.02,
    "validation_fraction": 0.2,
    "optimizer": "adam",
    "scheduler": "linear",
    "warmup_steps": 2,
    "device": "cpu",
}
STOP_AT = 9  # the killed run dies at this optimiser step, in epoch 2 (steps 6-10); last checkpoint: step 8


def _cells():
    import anndata
    import pandas as pd

    rng = np.random.default_rng(3)
    labels = np.where(np.arange(N_CELLS) % 2 == 0, "case", "control")
    x = rng.normal(1.0, 0.5, size=(N_CELLS, N_GENES)).astype(np.float32)
    x[:, 0] += np.where(labels == "case", 0.8, -0.8)  # gene 0 carries the label, with noise
    obs = pd.DataFrame({"label": labels}, index=[f"cell{i}" for i in range(N_CELLS)])
    return anndata.AnnData(X=x, obs=obs)


class _Recorder:
    """The metrics a process logs (only the main process should log any)."""

    def __init__(self):
        self.metrics = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


def _context(work_dir, logger=None, **train):
    from grnx_core import DataRoles, RunContext

    return RunContext(
        seed=0,
        roles=DataRoles(label_key="label"),
        adata=_cells(),
        train_settings=SimpleNamespace(**{**SETTINGS, **train}),
        logger=logger if logger is not None else _Recorder(),
        work_dir=work_dir,
    )


def _fit_mlp(work_dir, dropout=0.0, **train):
    from grnx_plugins.models.mlp import MLP

    logger = _Recorder()
    model = MLP(**MLP_PARAMS, dropout=dropout).fit(_context(work_dir, logger, **train))
    weights = {k: v.detach().cpu().clone() for k, v in model.network_.state_dict().items()}
    return weights, model.history_, logger.metrics


CELLUFORMER = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32, "dropout": 0.0}


def _fit_celluformer(build_tokens, build_context, **train):
    """A token model: cells of 3-8 genes, padded per piece (each process pads its own share).
    ``build_tokens`` / ``build_context``: conftest.py's (fixtures here, imported in the worker)."""
    from grnx_plugins.models.celluformer import CelluFormer

    tokens = build_tokens(n_cells=34)
    settings = {"epochs": 2, "learning_rate": 0.01, "validation_fraction": 0.2, **train}
    model = CelluFormer(**CELLUFORMER).fit(build_context(tokens, **settings))
    weights = {k: v.detach().cpu().clone() for k, v in model.network_.state_dict().items()}
    # The attention's key bias adds one constant to a query's logits, which softmax ignores: its
    # gradient is rounding noise that Adam scales to full steps (see test_training_scale.py).
    d = CELLUFORMER["d_model"]
    for name in [n for n in weights if n.endswith("in_proj_bias")]:
        weights[name] = torch.cat([weights[name][:d], weights[name][2 * d :]])
    return weights, model.history_


class _Killed(Exception):
    pass


def _regression_run(work_dir, stop_at=None, **train):
    """The MLP network with dropout on the loop directly (``on_step`` kills every process at once)."""
    from grnx_plugins.models import _training as training
    from grnx_plugins.models._mlp_net import MLPNet, MLPTask

    adata = _cells()
    labels = (adata.obs["label"].to_numpy() == "case").astype(np.int64)
    config = training.train_config(
        None, **{**SETTINGS, "batch_size": 4, "checkpoint_every_steps": 2, "resume": True, **train}
    )

    def on_step(epoch, step):
        if step == stop_at:
            raise _Killed

    device = torch.device("cpu")
    with training.deterministic(0, device):
        network = MLPNet(N_GENES, [8], 2, dropout=0.3)
        task = MLPTask(adata.X, labels, None, 0.0, None, device)
        from grnx_core import RunContext

        history = training.train(
            network,
            task,
            # 37 = 4 x 8 + 5: the last step of an epoch splits 3 + 2, so from then on the two
            # processes' random states differ (dropout drew for 3 cells on one, 2 on the other)
            train_idx=np.arange(37),
            val_idx=np.arange(37, N_CELLS),
            config=config,
            context=RunContext(work_dir=work_dir),
            rng=np.random.default_rng(7),
            device=device,
            on_step=on_step,
        )
    return {k: v.detach().clone() for k, v in network.state_dict().items()}, history


class _NanTask(Task):
    """y = 2x on 16 cells; cell 13's input is NaN, so only the process that holds it sees a NaN loss."""

    def __init__(self):
        self.x = torch.linspace(-1, 1, 16)[:, None]
        self.x[13] = float("nan")

    def batch(self, module, indices, training):
        rows = torch.as_tensor(indices)
        loss = ((module(self.x[rows]) - 2 * self.x[rows]) ** 2).mean()
        return BatchResult(loss=loss, n_items=len(rows))


def _nan_run() -> str:
    """The error every process raises (none may be left waiting for the one that stopped)."""
    from grnx_core import GrnxError
    from grnx_plugins.models import _training as training

    torch.manual_seed(0)
    try:
        training.train(
            torch.nn.Linear(1, 1),
            _NanTask(),
            train_idx=np.arange(16),
            val_idx=np.zeros(0, dtype=np.int64),
            config=training.train_config(None, epochs=2, batch_size=4, device="cpu"),
            context=None,
            rng=np.random.default_rng(0),
            device=torch.device("cpu"),
        )
    except GrnxError as error:
        return str(error)
    return ""


def _worker(out: Path, device: str = "cpu") -> None:
    """What each launched process runs; writes its results to ``out/rank<r>.pt``.

    ``device`` "cuda": one GPU per process (NCCL), the MLP and CelluFormer runs only.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")  # joins the process group torchrun set up
    rank, n_processes = state.process_index, state.num_processes
    torch.set_num_threads(1)
    if device == "cuda":
        from conftest import build_context, build_tokens

        result = {
            "plain": _fit_mlp(out / "plain", batch_size=4, device="cuda"),
            "celluformer": _fit_celluformer(build_tokens, build_context, batch_size=4, device="cuda"),
        }
        torch.save(result, out / f"rank{rank}.pt")
        return
    written: list[str] = []
    save = torch.save

    def recording_save(obj, f, *args, **kwargs):  # which files this process writes with torch.save
        if isinstance(f, (str, os.PathLike)):  # not the in-memory buffers gather_object pickles into
            written.append(str(f))
        return save(obj, f, *args, **kwargs)

    torch.save = recording_save
    try:
        plain = _fit_mlp(out / "plain", batch_size=4, checkpoint_every_steps=3)
        accumulated = _fit_mlp(out / "accumulated", batch_size=2, gradient_accumulation_steps=2)
        from conftest import build_context, build_tokens  # the launched script's folder is on the path

        celluformer = _fit_celluformer(build_tokens, build_context, batch_size=4)
        uninterrupted = _regression_run(out / "uninterrupted")
        try:
            _regression_run(out / "killed", stop_at=STOP_AT)
        except _Killed:
            killed = True
        else:
            killed = False
        resumed = _regression_run(out / "killed")
        nan_error = _nan_run()
    finally:
        torch.save = save
    result = {
        "rank": rank,
        "n_processes": n_processes,
        "plain": plain,
        "accumulated": accumulated,
        "celluformer": celluformer,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "killed": killed,
        "nan_error": nan_error,
        "written": [os.path.relpath(path, out) for path in written],
    }
    torch.save(result, out / f"rank{rank}.pt")


# ---------------------------------------------------------------------------------------------
# The tests (one two-process launch, shared)
# ---------------------------------------------------------------------------------------------


def _launch(out: Path, n_processes: int = 2, device: str = "cpu") -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port: parallel test runs do not collide
        f"--nproc_per_node={n_processes}",
        __file__,
        str(out),
        device,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "GRNX_PROGRESS": "0"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, f"{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n_processes)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("ddp"))


def _assert_close_weights(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def _assert_same_history(ddp, single):
    """Loss and validation metrics of every epoch; epoch_seconds is wall time."""
    assert len(ddp) == len(single)
    for got, expected in zip(ddp, single):
        assert set(got) == set(expected)
        for name, value in expected.items():
            if name.endswith("epoch_seconds"):
                continue
            assert got[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


@pytest.mark.slow
def test_two_processes_of_batch_4_train_like_one_process_of_batch_8(launched, tmp_path):
    from grnx_plugins.models import _training as training

    first, second = launched
    assert (first["n_processes"], second["n_processes"]) == (2, 2)
    # the preconditions of the check: a last step of 1 cell (one process gets none) and
    # validation batches that do not split evenly (4 + 4 + 2 cells: 2 batches and 1)
    labels = np.where(np.arange(N_CELLS) % 2 == 0, 0, 1)
    train_idx, val_idx = training.validation_split(labels, np.arange(N_CELLS), 0.2, np.random.default_rng(0))
    assert len(train_idx) % 8 == 1 and len(val_idx) == 10
    single_weights, single_history, _ = _fit_mlp(tmp_path, batch_size=8)
    for result in (first, second):  # both processes hold the same model
        weights, history, _ = result["plain"]
        _assert_close_weights(weights, single_weights, atol=2e-6)
        _assert_same_history(history, single_history)
    # the weights moved: the comparison is not of two untrained models
    start = _fit_mlp(tmp_path / "untrained", batch_size=8, epochs=0)[0]
    assert (single_weights["output.weight"] - start["output.weight"]).abs().max() > 0.01


@pytest.mark.slow
def test_accumulation_on_two_processes_equals_one_large_batch(launched, tmp_path):
    """2 cells x 2 pieces x 2 processes = 8 cells per optimiser step."""
    single_weights, single_history, _ = _fit_mlp(tmp_path, batch_size=8)
    for result in launched:
        weights, history, _ = result["accumulated"]
        _assert_close_weights(weights, single_weights, atol=2e-6)
        _assert_same_history(history, single_history)


@pytest.mark.slow
def test_a_token_model_on_two_processes_trains_like_one_process(launched, make_tokens, make_context):
    """CelluFormer: each process pads its own 4 cells, the single process pads 8 together."""
    single_weights, single_history = _fit_celluformer(make_tokens, make_context, batch_size=8)
    for result in launched:
        weights, history = result["celluformer"]
        _assert_close_weights(weights, single_weights, atol=1e-5)
        _assert_same_history(history, single_history)


@pytest.mark.slow
def test_only_the_main_process_logs_and_writes_checkpoints(launched):
    first, second = launched
    assert [step for step, _ in first["plain"][2]] == [1, 2, 3]
    assert second["plain"][2] == []  # the other process logged nothing
    assert second["written"] == []  # ... and wrote no checkpoint
    written = {Path(path).parent.as_posix() for path in first["written"]}
    assert written == {
        "plain/checkpoints/train",
        "uninterrupted/checkpoints/train",
        "killed/checkpoints/train",
    }
    assert all(Path(path).name.startswith(".checkpoint.pt.tmp-") for path in first["written"])


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(launched):
    """Dropout on: each process's random state must come back from the checkpoint."""
    for result in launched:
        assert result["killed"]
        weights, history = result["resumed"]
        reference_weights, reference_history = result["uninterrupted"]
        _assert_close_weights(weights, reference_weights, atol=0.0)
        _assert_same_history(history, reference_history)
    # the two processes drew different dropout masks yet hold one model
    _assert_close_weights(launched[0]["resumed"][0], launched[1]["resumed"][0], atol=0.0)


@pytest.mark.slow
def test_a_nan_loss_on_one_process_stops_every_process(launched):
    first, second = launched
    assert first["nan_error"] == second["nan_error"]
    assert re.match(
        r"Training diverged: the training loss is not finite at epoch 1, batch \d+ of process [01] ",
        first["nan_error"],
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs; torch sees fewer")
def test_two_gpus_train_like_one(tmp_path, make_tokens, make_context):
    """NCCL on 2 GPUs, batches of 4 each, against one GPU with batches of 8."""
    launched = _launch(tmp_path / "launched", device="cuda")
    single_weights, single_history, _ = _fit_mlp(tmp_path / "single", batch_size=8, device="cuda")
    tokens_weights, tokens_history = _fit_celluformer(make_tokens, make_context, batch_size=8, device="cuda")
    for result in launched:
        weights, history, _ = result["plain"]
        _assert_close_weights(weights, single_weights, atol=1e-5)
        _assert_same_history(history, single_history)
        weights, history = result["celluformer"]
        _assert_close_weights(weights, tokens_weights, atol=1e-4)
        _assert_same_history(history, tokens_history)


@pytest.mark.parametrize("n_cells", [1, 2, 7, 8, 9, 13])
def test_the_processes_pieces_take_every_cell_of_a_step_once(n_cells):
    """3 processes, pieces of 2 cells: each cell in one counted piece; as many pieces on every
    process; the weights (n_processes x share of the step) average to the mean over the step."""
    from grnx_plugins.models import _training as training

    step = np.arange(100, 100 + n_cells)
    by_process = [training.step_pieces(step, 2, 3, rank) for rank in range(3)]
    counted = [cells for pieces in by_process for cells, weight in pieces if weight > 0]
    np.testing.assert_array_equal(np.sort(np.concatenate(counted)), step)
    assert len({len(pieces) for pieces in by_process}) == 1
    for pieces in by_process:
        for cells, weight in pieces:
            assert weight == (len(cells) * 3 / n_cells if weight > 0 else 0.0)
            assert 1 <= len(cells) <= 2
    # DDP divides the sum of the processes' gradients by 3: the weights then sum to 1 per cell
    total = sum(weight for pieces in by_process for _, weight in pieces) / 3
    assert total == pytest.approx(1.0)
    # one process: the step's own pieces, weighted by their share (accumulation)
    single = training.step_pieces(step, 4)
    assert [len(cells) for cells, _ in single] == [len(step[i : i + 4]) for i in range(0, n_cells, 4)]
    assert [weight for _, weight in single] == [len(cells) / n_cells for cells, _ in single]


def test_bare_module_unwraps_distributed_data_parallel(tmp_path):
    """A task reads the model's layers from the module inside the DDP wrapper."""
    import torch.distributed as dist

    from grnx_plugins.models import _training as training

    network = torch.nn.Linear(2, 1)
    assert training.bare_module(network) is network
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(network)
        assert training.bare_module(wrapped) is network
    finally:
        dist.destroy_process_group()


def test_a_multi_process_checkpoint_is_not_continued_by_another_number_of_processes():
    from grnx_plugins.models import _training as training

    config = training.train_config(None)
    train_idx, val_idx = np.arange(10), np.arange(10, 12)
    one = training.fingerprint(config, train_idx, val_idx, "train")
    assert training.fingerprint(config, train_idx, val_idx, "train", 1) == one
    two = training.fingerprint(config, train_idx, val_idx, "train", 2)
    assert len({one, two, training.fingerprint(config, train_idx, val_idx, "train", 4)}) == 3


# ---------------------------------------------------------------------------------------------
# `torchrun -m grnx_core.cli run`: the engine's side (needs the core's multi-process support)
# ---------------------------------------------------------------------------------------------


def _core_supports_processes() -> bool:
    from grnx_core.cache import Cache

    return "read_only" in inspect.signature(Cache).parameters


RECIPE = textwrap.dedent(
    """\
    schema_version: 1
    name: ddp_mlp
    seed: 0
    data:
      name: synthetic
      params: {n_cells: 160, n_genes: 12, n_regulators: 3, n_donors: 4, n_rewired: 2, n_gained: 2, seed: 0}
      label_key: disease
    preprocess:
      - {name: normalize_total, params: {target_sum: 10000}}
      - {name: log1p, params: {}}
    model: {name: mlp, params: {hidden_sizes: [8], dropout: 0.0}}
    train: {epochs: 2, batch_size: BATCH, learning_rate: 0.01, optimizer: adam, validation_fraction: 0.1,
            device: cpu}
    tracking: {experiment: EXPERIMENT}
    """
)


def _grnx_run(folder: Path, experiment: str, batch_size: int, n_processes: int) -> None:
    """``grnx run`` (under torchrun for several processes) with its own cache in ``folder``."""
    folder.mkdir(exist_ok=True)
    recipe = folder / "recipe.yaml"
    text = RECIPE.replace("BATCH", str(batch_size)).replace("EXPERIMENT", experiment)
    recipe.write_text(text, encoding="utf-8")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_processes}"]
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GRNX_CACHE_DIR": str(folder / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder.parent / 'mlflow.db'}",
    }
    completed = subprocess.run(
        [sys.executable, *(launcher if n_processes > 1 else []), "-m", "grnx_core.cli", "run", str(recipe)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=folder,
    )
    assert completed.returncode == 0, f"{completed.stdout[-4000:]}\n{completed.stderr[-8000:]}"
    assert completed.stdout.count("run ") >= 1 and completed.stdout.count(": FINISHED") == 1  # one summary


@pytest.mark.slow
@pytest.mark.skipif(
    not _core_supports_processes(),
    reason="the engine writes the cache and the MLflow run from every process until grnx_core gains "
    "its multi-process support (Cache(read_only=...), rank-0-only tracking in `grnx run`)",
)
def test_grnx_run_under_torchrun_writes_one_run_and_one_model(tmp_path):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    launched, single = tmp_path / "two", tmp_path / "one"
    _grnx_run(launched, "ddp", batch_size=8, n_processes=2)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddp").experiment_id
    (run,) = client.search_runs([experiment])  # one MLflow run, not one per process
    assert run.info.status == "FINISHED"
    entries = sorted((launched / "cache" / "model").glob("*/*"))
    assert len(entries) == 1 and (entries[0] / "done.json").is_file()
    leftovers = [p.name for p in (launched / "cache").rglob(".*")]
    assert leftovers == []  # no scratch folder of another process, no checkpoint folder
    # Rerun: every process finds the model in the cache (none may wait in training for the others)
    _grnx_run(launched, "ddp", batch_size=8, n_processes=2)
    rerun = client.search_runs([experiment], order_by=["attributes.start_time DESC"])[0]
    assert len(client.search_runs([experiment])) == 2
    assert "model" in rerun.data.tags["grnx.cached_stages"].split(",")
    # One process with batches of 16 = two of 8: the same weights and metrics
    _grnx_run(single, "single", batch_size=16, n_processes=1)
    (reference,) = sorted((single / "cache" / "model").glob("*/*"))
    got = load_file(str(entries[0] / "model" / "model.safetensors"))
    expected = load_file(str(reference / "model" / "model.safetensors"))
    _assert_close_weights(got, expected, atol=2e-6)
    (single_run,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    for name in ("train/loss", "train/val_loss", "train/val_accuracy"):
        assert run.data.metrics[name] == pytest.approx(single_run.data.metrics[name], rel=1e-5), name


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), *sys.argv[2:3])
