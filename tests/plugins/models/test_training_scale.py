"""The training loop at scale: precision, accumulation, gradient checkpointing, resume, threads, donors.

Each check compares against an independent run: a plain fp32 run, one large batch, a run without
checkpointing, an uninterrupted run. Tiny models on CPU; the CUDA paths skip without a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from grnx_core import DataError, DataRoles, GrnxError, RunContext, threads
from grnx_plugins.models import _training as training
from grnx_plugins.models.celluformer import CelluFormer
from grnx_plugins.models.geneformer import Geneformer
from grnx_plugins.models.mlp import MLP

CELLUFORMER = {"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32}
GENEFORMER = {
    "n_layers": 2,
    "hidden_size": 16,
    "n_heads": 2,
    "intermediate_size": 32,
    "max_positions": 32,
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none")


def _weights(model):
    return {k: v.detach().cpu().clone() for k, v in model.network_.state_dict().items()}


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_bf16_on_cpu_predicts_like_fp32(make_tokens, make_context):
    tokens = make_tokens(n_cells=24)
    fp32 = CelluFormer(**CELLUFORMER, dropout=0.0).fit(make_context(tokens, epochs=8))
    bf16 = CelluFormer(**CELLUFORMER, dropout=0.0).fit(make_context(tokens, epochs=8, precision="bf16"))
    # bf16 rounds activations to 8 bits of mantissa: same classes, probabilities within a few %
    np.testing.assert_array_equal(bf16.predict(tokens), fp32.predict(tokens))
    np.testing.assert_allclose(bf16.predict_proba(tokens), fp32.predict_proba(tokens), atol=0.05)
    assert bf16.history_[-1]["train/loss"] == pytest.approx(fp32.history_[-1]["train/loss"], abs=0.05)
    # the autocast wrapper is gone after training: inference runs in float32
    batch_ids = torch.zeros(1, 3, dtype=torch.long)
    out = bf16.network_(batch_ids, torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool))
    assert out.dtype == torch.float32


def test_fp16_is_refused_on_cpu(make_tokens, make_context):
    with pytest.raises(GrnxError, match="fp16, which needs a CUDA GPU"):
        CelluFormer(**CELLUFORMER).fit(make_context(make_tokens(), epochs=1, precision="fp16"))


def test_gradient_accumulation_equals_the_large_batch(make_tokens, make_context):
    """4 x 8 cells per step = 32 cells per step: same loss curve and weights (no dropout). 60 cells
    leave a last step of 28 = 8 + 8 + 8 + 4, whose pieces count by their share of the cells."""
    tokens = make_tokens(n_cells=60)
    settings = {"epochs": 4, "learning_rate": 0.01}
    large = CelluFormer(**CELLUFORMER, dropout=0.0).fit(make_context(tokens, batch_size=32, **settings))
    accumulated = CelluFormer(**CELLUFORMER, dropout=0.0).fit(
        make_context(tokens, batch_size=8, gradient_accumulation_steps=4, **settings)
    )
    single = CelluFormer(**CELLUFORMER, dropout=0.0).fit(make_context(tokens, batch_size=8, **settings))
    curve = [h["train/loss"] for h in large.history_]
    np.testing.assert_allclose([h["train/loss"] for h in accumulated.history_], curve, rtol=1e-5)
    # The key bias adds one constant to a query's attention logits, which softmax ignores: its
    # gradient is 0 up to rounding, and Adam scales that rounding noise to full steps. Compare
    # the query and value biases only.
    d = CELLUFORMER["d_model"]
    expected, got = _weights(large), _weights(accumulated)
    for weights in (expected, got):
        for name in [n for n in weights if n.endswith("in_proj_bias")]:
            weights[name] = torch.cat([weights[name][:d], weights[name][2 * d :]])
    _assert_same_weights(got, expected, atol=1e-5)
    # the control: batches of 8 without accumulation take 4x the steps and end elsewhere
    assert not np.allclose([h["train/loss"] for h in single.history_], curve, rtol=1e-3)


def test_training_is_bitwise_deterministic_on_cpu(make_tokens, make_context):
    tokens = make_tokens(n_cells=24)
    first = CelluFormer(**CELLUFORMER, dropout=0.2).fit(make_context(tokens, epochs=3))
    second = CelluFormer(**CELLUFORMER, dropout=0.2).fit(make_context(tokens, epochs=3))
    _assert_same_weights(_weights(first), _weights(second))


@pytest.mark.parametrize(
    ("model_class", "params", "values"),
    [(CelluFormer, CELLUFORMER, "expression"), (Geneformer, GENEFORMER, None)],
)
def test_gradient_checkpointing_gives_the_same_weights(
    make_tokens, make_context, model_class, params, values
):
    """Recomputed blocks replay their dropout draws (RNG state preserved): same training."""
    prefix = None if values else ["<mask>"]
    tokens = make_tokens(n_cells=24, values=values, prefix=prefix)
    plain = model_class(**params, dropout=0.2).fit(make_context(tokens, epochs=2))
    recomputed = model_class(**params, dropout=0.2).fit(
        make_context(tokens, epochs=2, gradient_checkpointing=True)
    )
    _assert_same_weights(_weights(recomputed), _weights(plain), atol=1e-6)


def test_gradient_checkpointing_is_refused_for_the_mlp():
    rng = np.random.default_rng(0)
    adata = __import__("anndata").AnnData(
        X=rng.poisson(1.0, (20, 6)).astype(np.float32),
        obs=pd.DataFrame({"label": ["a", "b"] * 10}, index=[f"c{i}" for i in range(20)]),
    )
    context = RunContext(
        roles=DataRoles(label_key="label"),
        adata=adata,
        train_settings=SimpleNamespace(epochs=1, device="cpu", gradient_checkpointing=True),
    )
    with pytest.raises(GrnxError, match="no transformer blocks to recompute"):
        MLP(hidden_sizes=[4]).fit(context)


class _Killed(Exception):
    pass


class _KillingLogger:
    """Raises when the metrics of ``epoch`` arrive: the run dies after that epoch's last step."""

    def __init__(self, epoch):
        self.epoch, self.metrics = epoch, []

    def log_metrics(self, metrics, step=None):
        if step == self.epoch:
            raise _Killed
        self.metrics.append((step, dict(metrics)))


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(make_tokens, make_context, tmp_path):
    tokens = make_tokens(n_cells=24)
    settings = {"epochs": 3, "resume": True}
    reference_context = make_context(tokens, **settings)
    reference_context.work_dir = tmp_path / "reference"
    uninterrupted = CelluFormer(**CELLUFORMER, dropout=0.2).fit(reference_context)
    killed_context = make_context(tokens, **settings)
    killed_context.work_dir, killed_context.logger = tmp_path, _KillingLogger(epoch=2)
    with pytest.raises(_Killed):
        CelluFormer(**CELLUFORMER, dropout=0.2).fit(killed_context)
    assert (tmp_path / "checkpoints" / "train" / training.CHECKPOINT_FILE).is_file()
    resumed_context = make_context(tokens, **settings)
    resumed_context.work_dir = tmp_path
    resumed = CelluFormer(**CELLUFORMER, dropout=0.2).fit(resumed_context)
    _assert_same_weights(_weights(resumed), _weights(uninterrupted))
    drop = "train/epoch_seconds"
    assert [{k: v for k, v in h.items() if k != drop} for h in resumed.history_] == [
        {k: v for k, v in h.items() if k != drop} for h in uninterrupted.history_
    ]
    # the resumed run's record holds every epoch, the restored ones included
    assert [step for step, _ in resumed_context.logger.metrics] == [1, 2, 3]


class _Regression(training.Task):
    """y = x @ w with dropout in the model: the loss depends on torch's RNG and the batch order."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, 3, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5])
        self.noise = torch.Generator().manual_seed(1)  # a task's own generator, restored on resume

    def batch(self, module, indices, training):
        rows = torch.as_tensor(indices)
        jitter = torch.randn(len(rows), generator=self.noise) * 0.01 if training else 0.0
        loss = torch.nn.functional.mse_loss(module(self.x[rows]).squeeze(-1), self.y[rows] + jitter)
        return training_batch_result(loss=loss, n_items=len(rows))


training_batch_result = training.BatchResult


def _regression_run(tmp_path, stop_at=None, **settings):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 1))

    def on_step(epoch, step):
        if step == stop_at:
            raise _Killed

    history = training.train(
        module,
        _Regression(),
        train_idx=np.arange(40),
        val_idx=np.zeros(0, dtype=np.int64),
        config=training.train_config(
            None,
            **{"epochs": 3, "batch_size": 4, "learning_rate": 0.01, "scheduler": "cosine", **settings},
            device="cpu",
        ),
        context=RunContext(work_dir=tmp_path),
        rng=np.random.default_rng(5),
        device=torch.device("cpu"),
        on_step=on_step,
    )
    return module, history


def test_a_run_killed_inside_an_epoch_resumes_from_its_last_step_checkpoint(tmp_path):
    reference, reference_history = _regression_run(tmp_path / "reference")
    with pytest.raises(_Killed):  # epoch 2 has steps 11-20; the checkpoint of step 14 survives
        _regression_run(tmp_path / "run", stop_at=15, checkpoint_every_steps=2)
    resumed, history = _regression_run(tmp_path / "run", checkpoint_every_steps=2, resume=True)
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["train/loss"] for h in history] == [h["train/loss"] for h in reference_history]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    _regression_run(tmp_path, resume=True)
    with pytest.raises(GrnxError, match="other train settings"):
        _regression_run(tmp_path, resume=True, learning_rate=0.02)


def test_checkpoints_need_a_work_folder(make_tokens, make_context):
    with pytest.raises(GrnxError, match="need a folder for checkpoints"):
        CelluFormer(**CELLUFORMER).fit(make_context(make_tokens(), epochs=1, resume=True))


class _ThreadSpy(training.Task):
    def __init__(self):
        self.seen = set()
        self.x = torch.ones(8, 1)

    def batch(self, module, indices, training):
        self.seen.add(torch.get_num_threads())
        loss = module(self.x[torch.as_tensor(indices)]).pow(2).mean()
        return training.BatchResult(loss=loss, n_items=len(indices))


def test_num_threads_comes_from_execution_then_the_environment(monkeypatch):
    from grnx_core.recipe import ExecutionSettings

    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    context = RunContext(execution=ExecutionSettings(num_threads=target))
    with threads.torch_threads(context):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    monkeypatch.setenv("GRNX_NUM_THREADS", str(target))
    assert threads.thread_count(RunContext()) == target
    assert threads.thread_count(RunContext(execution=ExecutionSettings(num_threads=1))) == 1  # recipe wins
    monkeypatch.setenv("GRNX_NUM_THREADS", "many")
    with pytest.raises(GrnxError, match="GRNX_NUM_THREADS must be a whole number"):
        threads.thread_count(RunContext())


def test_a_model_fits_with_the_configured_threads(make_tokens, make_context, monkeypatch):
    before = torch.get_num_threads()
    target = 2 if before != 2 else 3
    seen = []
    original = training.train

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    monkeypatch.setenv("GRNX_NUM_THREADS", str(target))
    CelluFormer(**CELLUFORMER).fit(make_context(make_tokens(), epochs=1))
    assert seen == [target] and torch.get_num_threads() == before


def test_validation_holds_out_whole_donors_per_label():
    labels = np.repeat([0, 1], 60)
    donors = np.array([f"d{i // 10}" for i in range(120)], dtype=object)  # 6 donors per label
    train_idx, val_idx = training.validation_split(
        labels, np.arange(120), 0.3, np.random.default_rng(0), donors
    )
    assert np.intersect1d(train_idx, val_idx).size == 0 and len(train_idx) + len(val_idx) == 120
    assert not set(donors[train_idx]) & set(donors[val_idx])  # no donor on both sides
    # about 30% of each label's cells: 2 of its 6 donors (18 cells reached after the second)
    assert np.bincount(labels[val_idx]).tolist() == [20, 20]


def test_a_donor_split_without_two_donors_of_a_label_is_refused():
    labels, donors = np.repeat([0, 1], 10), np.repeat(["a", "b"], 10).astype(object)
    with pytest.raises(DataError, match="no donor can be held out"):
        training.validation_split(labels, np.arange(20), 0.2, np.random.default_rng(0), donors)


def test_a_token_model_validates_on_held_out_donors(make_tokens, make_context, monkeypatch):
    tokens = make_tokens(n_cells=40)
    tokens.obs["donor"] = [f"d{i % 8}" for i in range(40)]  # cell i: label i % 2, donor i % 8
    context = make_context(tokens, epochs=1, validation_fraction=0.25)
    context.roles.donor_key = "donor"
    seen = {}
    original = training.train

    def spy(*args, **kwargs):
        seen["train"], seen["val"] = kwargs["train_idx"], kwargs["val_idx"]
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    model = CelluFormer(**CELLUFORMER).fit(context)
    donors = tokens.obs["donor"].to_numpy()
    assert len(seen["val"]) == 10 and not set(donors[seen["train"]]) & set(donors[seen["val"]])
    assert "train/val_loss" in model.history_[0]


def test_masked_lm_masking_follows_the_hugging_face_rule(make_tokens):
    """15% of gene tokens chosen, never padding or special tokens; 80% -> <mask>, 10% -> random."""
    from grnx_plugins.models._token_tasks import MaskedLMTask, make_batch

    tokens = make_tokens(n_cells=40, values=None, prefix=["<mask>", "<cls>"], min_genes=8, max_genes=12)
    model = Geneformer(**GENEFORMER)
    model.token_info_ = {"pad_id": 0, "pad_value": 0.0, "special_ids": [0, 1, 2], "vocab_size": 23}
    model.network_ = SimpleNamespace(uses_values=False)
    task = MaskedLMTask(model, tokens, mask_id=1, probability=0.15, device=torch.device("cpu"), seed=0)
    batch = make_batch(model, tokens, np.arange(40), torch.device("cpu"))
    chosen = masked = changed = 0
    for _ in range(300):
        inputs, labels = task.mask(batch.ids, batch.keep, task.generator)
        picked = labels != -100
        assert not bool((picked & ~batch.keep).any())
        assert torch.equal(labels[picked], batch.ids[picked])
        chosen += int(picked.sum())
        masked += int((picked & (inputs == 1)).sum())
        changed += int((picked & (inputs != batch.ids)).sum())
    genes = 300 * int(batch.keep.sum())
    assert chosen / genes == pytest.approx(0.15, abs=0.005)
    # 80% <mask>, plus random draws that hit <mask> (1 in 23); 10% random, 22 in 23 a change
    assert masked / chosen == pytest.approx(0.8 + 0.1 / 23, abs=0.01)
    assert changed / chosen == pytest.approx(0.8 + 0.1 * 22 / 23, abs=0.01)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_predicts_like_fp32(make_tokens, make_context, precision):
    tokens = make_tokens(n_cells=32)
    fp32 = CelluFormer(**CELLUFORMER, dropout=0.0).fit(make_context(tokens, epochs=15, device="cuda"))
    mixed = CelluFormer(**CELLUFORMER, dropout=0.0).fit(
        make_context(tokens, epochs=15, device="cuda", precision=precision)
    )
    np.testing.assert_array_equal(mixed.predict(tokens), fp32.predict(tokens))
    np.testing.assert_allclose(mixed.predict_proba(tokens), fp32.predict_proba(tokens), atol=0.05)


@needs_cuda
def test_gradient_checkpointing_on_cuda_gives_the_same_weights(make_tokens, make_context):
    tokens = make_tokens(n_cells=24, values=None, prefix=["<mask>"])
    plain = Geneformer(**GENEFORMER, dropout=0.0).fit(make_context(tokens, epochs=3, device="cuda"))
    recomputed = Geneformer(**GENEFORMER, dropout=0.0).fit(
        make_context(tokens, epochs=3, device="cuda", gradient_checkpointing=True)
    )
    _assert_same_weights(_weights(recomputed), _weights(plain), atol=1e-5)
