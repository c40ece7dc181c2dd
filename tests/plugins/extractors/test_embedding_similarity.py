"""embedding_similarity: cosine of gene embeddings equals a brute force from each model's weights
(input) or from a cell-by-cell forward pass through an independent reference (contextual)."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from grnx_core import CellSample, DataError, DataRoles, RunContext, TokenizedCells
from grnx_plugins.extractors.embedding_similarity import EmbeddingSimilarityExtractor

VOCABULARY = ["<pad>", "<cls>", "<eos>"] + [f"G{i}" for i in range(1, 9)]
GENE_IDS = np.arange(3, len(VOCABULARY))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tokens(kind: str, n_cells: int = 12, seed: int = 0) -> TokenizedCells:
    """Labelled cells of 3-6 genes; G8 (id 10) is expressed in no cell.

    ``kind``: "scaled" (expression values, no special token), "binned" (<cls> first, bins 1..5)
    or "rank" (no values, <cls> ... <eos>, as Geneformer V2 cells).
    """
    rng = np.random.default_rng(seed)
    ids, values, offsets = [], [], [0]
    for _ in range(n_cells):
        genes = list(rng.choice(GENE_IDS[:-1], int(rng.integers(3, 7)), replace=False))
        if kind == "scaled":
            ids += genes
            values += list(rng.uniform(0.5, 2.0, len(genes)))
        elif kind == "binned":
            ids += [1, *genes]
            values += [0.0, *rng.integers(1, 6, len(genes)).astype(float)]
        else:
            ids += [1, *genes, 2]
        offsets.append(len(ids))
    obs = pd.DataFrame(
        {"label": ["case" if c % 2 == 0 else "control" for c in range(n_cells)]},
        index=[f"c{c}" for c in range(n_cells)],
    )
    return TokenizedCells(
        np.array(ids),
        np.array(offsets),
        obs,
        values=None if kind == "rank" else np.array(values),
        vocabulary=VOCABULARY,
        metadata={"pad_id": 0, "vocab_size": len(VOCABULARY)},
    )


def _context(tokens: TokenizedCells, model=None) -> RunContext:
    weights = np.random.default_rng(7).uniform(0.2, 3.0, tokens.n_cells)
    return RunContext(
        seed=0,
        roles=DataRoles(label_key="label"),
        tokens=tokens,
        model=model,
        train_settings=SimpleNamespace(
            epochs=1, batch_size=4, learning_rate=0.003, validation_fraction=0.0, device="cpu"
        ),
        sample=CellSample(np.arange(tokens.n_cells), weights, n_cells_total=100),
    )


def _fit(kind: str):
    from grnx_plugins.models.celluformer import CelluFormer
    from grnx_plugins.models.geneformer import Geneformer
    from grnx_plugins.models.scgpt import ScGPT

    tokens = _tokens({"celluformer": "scaled", "scgpt": "binned", "geneformer": "rank"}[kind])
    context = _context(tokens)
    model = {
        "celluformer": lambda: CelluFormer(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0),
        "scgpt": lambda: ScGPT(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0, n_layers_cls=1),
        "geneformer": lambda: Geneformer(
            n_layers=2, hidden_size=16, n_heads=2, intermediate_size=32, max_positions=32, dropout=0.0
        ),
    }[kind]()
    context.model = model.fit(context)
    return context


@pytest.fixture(scope="module", params=["celluformer", "scgpt", "geneformer"])
def run(request):
    return _fit(request.param)


@pytest.fixture(scope="module")
def celluformer_run():
    return _fit("celluformer")


# -- independent references -------------------------------------------------------------------


def _input_table(model) -> np.ndarray:
    """Each model's input gene embedding, read from its weights (scGPT: LayerNorm by hand)."""
    net = model.network_
    if model.name == "celluformer":
        return net.embedding.weight.detach().double().numpy()
    if model.name == "geneformer":
        return net.hf.bert.embeddings.word_embeddings.weight.detach().double().numpy()
    table = net.encoder.embedding.weight.detach().double().numpy()
    norm = net.encoder.enc_norm
    centred = table - table.mean(axis=1, keepdims=True)
    scaled = centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + norm.eps)
    return scaled * norm.weight.detach().double().numpy() + norm.bias.detach().double().numpy()


def _torch_layers(encoder_layers, d_model, n_heads, d_ff):
    """``nn.TransformerEncoderLayer`` copies of grnx's blocks (same state-dict names)."""
    copies = []
    for layer in encoder_layers:
        reference = torch.nn.TransformerEncoderLayer(
            d_model, n_heads, d_ff, dropout=0.0, batch_first=True, norm_first=layer.norm_first
        )
        reference.load_state_dict(layer.state_dict())
        copies.append(reference.eval())
    return copies


def _cell_hidden(model, tokens, cell, layer):
    """Hidden states of one cell (no batch, no padding), all positions, from a reference forward."""
    net = model.network_
    ids, values = tokens.cell(cell)
    ids_t = torch.tensor(ids[None], dtype=torch.long)
    with torch.no_grad():
        if model.name == "geneformer":
            states = net.hf.bert(input_ids=ids_t, output_hidden_states=True).hidden_states
            return states[layer][0].double().numpy()
        values_t = torch.tensor(values[None], dtype=torch.float32)
        if model.name == "celluformer":
            x = net.embedding(ids_t) * values_t[..., None]
            blocks = net.encoder.layers
        else:
            x = net.encoder(ids_t) + net.value_encoder(values_t)
            blocks = net.transformer_encoder.layers
        d_model = x.shape[-1]
        references = _torch_layers(blocks, d_model, blocks[0].n_heads, blocks[0].linear1.out_features)
        n_run = layer if layer >= 0 else len(references) + 1 + layer
        for reference in references[:n_run]:
            x = reference(x)
        return x[0].double().numpy()


def _brute_cosine(vectors: dict[str, np.ndarray]) -> dict[frozenset, float]:
    result = {}
    names = sorted(vectors)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            dot = sum(float(x) * float(y) for x, y in zip(vectors[a], vectors[b]))
            norm_a = math.sqrt(sum(float(x) ** 2 for x in vectors[a]))
            norm_b = math.sqrt(sum(float(y) ** 2 for y in vectors[b]))
            result[frozenset((a, b))] = dot / (norm_a * norm_b)
    return result


def _as_dict(interactions) -> dict[frozenset, float]:
    table = interactions.table
    return {frozenset((s, t)): v for s, t, v in table[["source", "target", "score"]].itertuples(index=False)}


def _present_genes(tokens) -> list[str]:
    present = sorted({int(i) for i in tokens.input_ids} & set(GENE_IDS.tolist()))
    return [VOCABULARY[i] for i in present]


# -- equality with the references -------------------------------------------------------------


def test_input_similarity_equals_cosine_of_the_weight_rows(run):
    result = EmbeddingSimilarityExtractor(source="input").extract(run)
    table = _input_table(run.model)
    genes = _present_genes(run.tokens)
    expected = _brute_cosine({g: table[VOCABULARY.index(g)] for g in genes})
    got = _as_dict(result)
    assert got.keys() == expected.keys()
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, abs=1e-6)  # scGPT: float32 LayerNorm
    assert np.all(np.diff(result.table["score"].to_numpy()) <= 0)
    assert not result.directed and result.metadata["source"] == "input"


@pytest.mark.parametrize("weighting", ["sample", "uniform"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_contextual_similarity_equals_weighted_cell_loop(run, weighting, layer):
    tokens = run.tokens
    result = EmbeddingSimilarityExtractor(
        source="contextual", layer=layer, weighting=weighting, batch_size=3
    ).extract(run)
    weights = run.sample.weights if weighting == "sample" else np.ones(tokens.n_cells)
    sums, totals = {}, {}
    for cell in range(tokens.n_cells):
        hidden = _cell_hidden(run.model, tokens, cell, layer)
        ids, _ = tokens.cell(cell)
        for position, token in enumerate(ids):
            if token in GENE_IDS:
                gene = VOCABULARY[token]
                sums[gene] = sums.get(gene, 0.0) + weights[cell] * hidden[position]
                totals[gene] = totals.get(gene, 0.0) + weights[cell]
    expected = _brute_cosine({gene: sums[gene] / totals[gene] for gene in sums})
    got = _as_dict(result)
    assert got.keys() == expected.keys()
    for pair, value in expected.items():
        assert got[pair] == pytest.approx(value, abs=2e-5)


def test_universe_rules(celluformer_run):
    tokens = celluformer_run.tokens
    counts = {}
    for cell in range(tokens.n_cells):
        for token in set(tokens.cell(cell)[0].tolist()):
            counts[VOCABULARY[token]] = counts.get(VOCABULARY[token], 0) + 1
    top = EmbeddingSimilarityExtractor(n_genes=4).extract(celluformer_run)
    threshold = sorted(counts.values(), reverse=True)[3]
    assert len(top.genes) == 4 and all(counts[g] >= threshold for g in top.genes)
    # an explicit universe may name a gene no cell expresses: its input embedding exists
    named = EmbeddingSimilarityExtractor(genes=["G8", "G1", "G2"], top_k=2).extract(celluformer_run)
    assert set(named.genes) == {"G1", "G2", "G8"} and len(named.table) == 2


# -- refused input ----------------------------------------------------------------------------


def test_missing_or_unfit_models_are_refused():
    tokens = _tokens("scaled")
    with pytest.raises(DataError, match="needs a token model with gene embeddings.*no model"):
        EmbeddingSimilarityExtractor().extract(_context(tokens))
    with pytest.raises(DataError, match="model 'mlp'"):
        EmbeddingSimilarityExtractor().extract(_context(tokens, SimpleNamespace(name="mlp")))


def test_bad_settings_are_refused(celluformer_run):
    with pytest.raises(ValidationError, match="layer=2 applies to source 'contextual' only"):
        EmbeddingSimilarityExtractor(source="input", layer=2)
    with pytest.raises(DataError, match=r"layer 3 is outside \[-3, 2\]"):
        EmbeddingSimilarityExtractor(source="contextual", layer=3).extract(celluformer_run)
    with pytest.raises(DataError, match="1 of the 2 genes of params.genes are not in the data"):
        EmbeddingSimilarityExtractor(genes=["G1", "NOPE"]).extract(celluformer_run)
    with pytest.raises(DataError, match="special tokens"):
        EmbeddingSimilarityExtractor(genes=["G1", "<cls>"]).extract(celluformer_run)
    with pytest.raises(DataError, match="'G8'.*no contextual embedding"):
        EmbeddingSimilarityExtractor(source="contextual", genes=["G1", "G8"]).extract(celluformer_run)


def test_zero_embedding_is_refused(celluformer_run):
    model = copy.deepcopy(celluformer_run.model)
    with torch.no_grad():
        model.network_.embedding.weight[VOCABULARY.index("G2")] = 0.0
    context = _context(celluformer_run.tokens, model)
    with pytest.raises(DataError, match="input embeddings of 1 genes are zero or not finite.*'G2'"):
        EmbeddingSimilarityExtractor(genes=["G1", "G2", "G3"]).extract(context)
