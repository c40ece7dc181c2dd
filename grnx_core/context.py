"""The run context: one object passed along the stages, holding what earlier stages produced."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from grnx_core.errors import DataError

if TYPE_CHECKING:
    import anndata
    import matplotlib.figure
    import pandas as pd

    from grnx_core.components import Model, Tokenizer
    from grnx_core.data_types import CellSample, GroundTruth, Interactions, TokenizedCells
    from grnx_core.recipe import ExecutionSettings, TrainSettings


class RunLogger(Protocol):
    """What components and the executor may log during a run.

    ``grnx_core.tracking.TrackedRun`` implements it over MLflow, :class:`NullLogger` drops
    everything, and ``grnx_core.stage_log.RecordingLogger`` records a stage's logging for replay.
    """

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_figure(self, name: str, figure: matplotlib.figure.Figure) -> None: ...

    def log_table(self, name: str, table: pd.DataFrame) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class NullLogger:
    """Logs nothing: for components used outside a tracked run (notebooks, tests)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_figure(self, name: str, figure: matplotlib.figure.Figure) -> None:
        pass

    def log_table(self, name: str, table: pd.DataFrame) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


@dataclass
class DataRoles:
    """Which obs columns play which role; set in the recipe's ``data`` section."""

    label_key: str | None = None
    donor_key: str | None = None
    batch_key: str | None = None
    cell_type_key: str | None = None
    #: obs column holding "train"/"test" when a split step ran.
    split_key: str = "split"


@dataclass
class RunContext:
    """Everything a component may read: the data, the roles of obs columns, earlier outputs."""

    seed: int = 0
    roles: DataRoles = field(default_factory=DataRoles)
    #: the recipe's ``train`` section (components never see the whole recipe)
    train_settings: TrainSettings | None = None
    #: the recipe's ``execution`` section: Ray address, workers, threads (speed, never results)
    execution: ExecutionSettings | None = None
    adata: anndata.AnnData | None = None
    ground_truth: GroundTruth | None = None
    #: every network the data source ships, by name (``DataSource.ground_truths()``)
    ground_truths: dict[str, GroundTruth] = field(default_factory=dict)
    sample: CellSample | None = None
    tokens: TokenizedCells | None = None
    #: the fitted tokenizer that made ``tokens`` (e.g. to tokenise perturbed cells the same way).
    tokenizer: Tokenizer | None = None
    model: Model | None = None
    interactions: dict[str, Interactions] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    logger: RunLogger = field(default_factory=NullLogger)
    work_dir: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def rng(self, stream: str) -> np.random.Generator:
        """A generator for one named stream of randomness, fixed by the run seed and the name.

        Stages draw from their own stream so adding a stage does not change another's draws.
        """
        digest = hashlib.sha256(stream.encode()).digest()
        return np.random.default_rng([self.seed, int.from_bytes(digest[:8], "little")])

    @property
    def train(self) -> TrainSettings:
        """How models train: the recipe's ``train`` section, defaults outside a recipe."""
        from grnx_core.recipe import TrainSettings

        return self.train_settings if self.train_settings is not None else TrainSettings()

    @property
    def execute(self) -> ExecutionSettings:
        """Where work runs: the recipe's ``execution`` section, defaults outside a recipe."""
        from grnx_core.recipe import ExecutionSettings

        return self.execution if self.execution is not None else ExecutionSettings()

    def require_adata(self, who: str) -> anndata.AnnData:
        if self.adata is None:
            raise DataError(f"{who} needs data, but the recipe loaded none. Add a 'data' section.")
        return self.adata

    def sampled_adata(self) -> tuple[anndata.AnnData, np.ndarray]:
        """The cells of the sample (all cells when no sampler ran) and their weights."""
        adata = self.require_adata("this step")
        if self.sample is None:
            return adata, np.ones(adata.n_obs)
        return adata[self.sample.indices], self.sample.weights

    def cell_column(self, tokens: TokenizedCells, key: str) -> pd.Series | None:
        """A per-cell column for ``tokens``: from their carried obs, else from ``adata`` by cell name."""
        if key in tokens.obs.columns:
            return tokens.obs[key]
        adata = self.adata
        if adata is not None and key in adata.obs.columns:
            names = tokens.obs.index
            if names.isin(adata.obs_names).all():
                return adata.obs.loc[names, key]
        return None

    def require_obs(self, key: str | None, role: str, who: str) -> str:
        """Check an obs column exists; ``role`` names what it is for in the message."""
        adata = self.require_adata(who)
        if key is None:
            raise DataError(
                f"{who} needs a {role} column, but none is set. Set data.{role} in the recipe "
                f"(obs columns: {', '.join(map(str, adata.obs.columns[:20]))})."
            )
        if key not in adata.obs.columns:
            raise DataError(
                f"{who} needs obs column {key!r} ({role}), which the data does not have. "
                f"Available: {', '.join(map(str, adata.obs.columns[:20]))}."
            )
        return key
