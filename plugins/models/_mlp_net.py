"""The MLP that NID reads (Tsang, Cheng, Liu, ICLR 2018): Softplus hidden layers, first layer without bias."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from grnx_plugins.models._training import BatchResult, Task, bare_module


class MLPNet(nn.Module):
    """``hidden.0`` (no bias) -> Softplus -> dropout -> ... -> ``output`` (one logit per class)."""

    def __init__(self, n_inputs: int, hidden_sizes: list[int], n_classes: int, dropout: float) -> None:
        super().__init__()
        sizes = [n_inputs, *hidden_sizes]
        self.hidden = nn.ModuleList(
            nn.Linear(sizes[i], sizes[i + 1], bias=i > 0) for i in range(len(hidden_sizes))
        )
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(sizes[-1], n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.dropout(F.softplus(layer(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))

    def weight_matrices(self) -> list[np.ndarray]:
        return [layer.weight.detach().cpu().numpy().copy() for layer in [*self.hidden, self.output]]


def dense_rows(matrix: np.ndarray | sp.spmatrix, rows: np.ndarray) -> np.ndarray:
    block = matrix[rows]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return block.astype(np.float32, copy=False)


class MLPTask(Task):
    """Cross-entropy on dense rows of the expression matrix, plus NID's L1 penalty on the weights."""

    def __init__(
        self,
        matrix: np.ndarray | sp.spmatrix,
        labels: np.ndarray,
        class_weights: np.ndarray | None,
        l1: float,
        scale: tuple[np.ndarray, np.ndarray] | None,
        device: torch.device,
    ) -> None:
        self.matrix, self.labels, self.l1, self.scale, self.device = matrix, labels, l1, scale, device
        self.weight = (
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=device)
        )

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        block = dense_rows(self.matrix, rows)
        if self.scale is not None:
            block = (block - self.scale[0]) / self.scale[1]
        return torch.from_numpy(block).to(self.device)

    def batch(self, module: torch.nn.Module, indices: np.ndarray, training: bool) -> BatchResult:
        logits = module(self.inputs(indices))
        targets = torch.from_numpy(self.labels[indices]).to(self.device)
        loss = F.cross_entropy(logits, targets, weight=self.weight)
        if self.l1 > 0:  # the layers of the model itself: a DDP wrapper does not forward them
            network = bare_module(module)
            loss = loss + self.l1 * sum(
                layer.weight.abs().sum() for layer in [*network.hidden, network.output]
            )
        return BatchResult(
            loss=loss,
            n_items=len(indices),
            predictions=logits.argmax(-1).detach().cpu().numpy(),
            targets=self.labels[indices],
        )
