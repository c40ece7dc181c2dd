"""Ground-truth builders on the real reference files in ../shared/data/ground_truth."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from grnx_core import DataError, GroundTruth, Interactions, RunContext
from grnx_plugins.evaluators.auprc import AuprcEvaluator
from grnx_plugins.evaluators.ground_truth import GroundTruthSpec, build_ground_truth
from grnx_plugins.evaluators.nes import NesEvaluator


@pytest.fixture(scope="module")
def gt_dir(shared_data):
    return shared_data / "ground_truth"


def ad_spec(gt_dir, match_on, min_score, **extra):
    return GroundTruthSpec(
        source="file",
        path=str(gt_dir / "biogrid_3.4.126_human_pairs.tsv"),
        format="biogrid",
        disease_genes={"path": str(gt_dir / "disgenet_alzheimers_C0002395_gda.tsv"), "min_score": min_score},
        match_on=match_on,
        **extra,
    )


# ../shared/data/README.md: BioGRID pairs of DisGeNET Alzheimer's genes, undirected, no self-pairs.
@pytest.mark.parametrize(
    ("match_on", "min_score", "expected"),
    [
        ("entrez", None, 16_096),
        ("entrez", 0.1, 1_039),
        ("entrez", 0.3, 105),
        ("symbol", None, 15_291),
        ("symbol", 0.1, 1_021),
        ("symbol", 0.3, 104),
    ],
)
def test_alzheimers_pair_set_has_the_documented_sizes(gt_dir, match_on, min_score, expected):
    gene_ids = "entrez" if match_on == "entrez" else "symbol"
    truth = build_ground_truth(ad_spec(gt_dir, match_on, min_score, gene_ids=gene_ids))
    assert not truth.directed
    assert len(truth.edges) == expected
    assert len(truth.pair_set()) == expected
    assert not (truth.edges["source"] == truth.edges["target"]).any()


def test_entrez_matched_pairs_expressed_as_symbols_and_ensembl(gt_dir):
    gencode = str(gt_dir / "gencode_human_ensembl_symbol_entrez.tsv")
    by_symbol = build_ground_truth(ad_spec(gt_dir, "entrez", 0.3))
    assert "APP" in by_symbol.genes and "PSEN1" in by_symbol.genes
    by_ensembl = build_ground_truth(ad_spec(gt_dir, "entrez", 0.3, gene_ids="ensembl", gencode=gencode))
    assert "ENSG00000142192" in by_ensembl.genes  # APP (Entrez 351)
    assert all(g.startswith("ENSG") for g in by_ensembl.genes)
    assert 95 <= len(by_ensembl.edges) <= 105  # a few Entrez IDs have no GENCODE row


def test_kegg_pathway_filter(gt_dir):
    spec = GroundTruthSpec(
        source="file",
        path=str(gt_dir / "biogrid_3.4.126_human_pairs.tsv"),
        format="biogrid",
        disease_genes={"path": str(gt_dir / "kegg_hsa05010_alzheimer_genes.txt"), "format": "list"},
    )
    truth = build_ground_truth(spec)
    kegg = set((gt_dir / "kegg_hsa05010_alzheimer_genes.txt").read_text().split())
    assert truth.genes <= kegg
    biogrid = pd.read_csv(gt_dir / "biogrid_3.4.126_human_pairs.tsv", sep="\t")
    keep = (
        biogrid["symbol_A"].isin(kegg)
        & biogrid["symbol_B"].isin(kegg)
        & (biogrid["symbol_A"] != biogrid["symbol_B"])
    )
    pairs = {"|".join(sorted(p)) for p in zip(biogrid["symbol_A"][keep], biogrid["symbol_B"][keep])}
    assert truth.pair_set() == pairs


def test_trrust_is_directed_and_signed(gt_dir):
    truth = build_ground_truth(
        GroundTruthSpec(source="file", path=str(gt_dir / "trrust_v2_human.tsv"), format="trrust")
    )
    assert truth.directed
    raw = pd.read_csv(gt_dir / "trrust_v2_human.tsv", sep="\t")
    raw = raw[raw["TF"] != raw["gene_symbol"]]  # self-regulation is not a pair
    assert len(truth.edges) == len(raw.drop_duplicates(["TF", "gene_symbol"]))
    edge = truth.edges.set_index("pair").loc["AATF|BAX"]
    assert edge["sign"] == -1  # TRRUST: AATF represses BAX
    both = raw.groupby(["TF", "gene_symbol"])["interaction"].nunique()
    tf, target = both[both > 1].index[0]
    assert truth.edges.set_index("pair").loc[f"{tf}|{target}", "sign"] == 0  # conflicting modes


def test_dorothea_confidence_filter(gt_dir):
    path = str(gt_dir / "dorothea_human_ABC.tsv")
    raw = pd.read_csv(path, sep="\t")
    truth = build_ground_truth(
        GroundTruthSpec(source="file", path=path, format="dorothea", confidence=["A", "B"])
    )
    expected = raw[raw["confidence"].isin(["A", "B"]) & (raw["tf"] != raw["target"])].drop_duplicates(
        ["tf", "target"]
    )
    assert len(truth.edges) == len(expected)
    assert set(truth.edges["sign"]) <= {-1, 1}


def test_beeline_string_edges_listed_twice_collapse_to_one_pair(gt_dir):
    path = gt_dir / "beeline_networks" / "human" / "STRING-network.csv"
    truth = build_ground_truth(GroundTruthSpec(source="file", path=str(path), format="string"))
    raw = pd.read_csv(path)
    raw = raw[raw["Gene1"] != raw["Gene2"]]
    unordered = {tuple(sorted(p)) for p in zip(raw["Gene1"], raw["Gene2"])}
    assert not truth.directed
    assert len(truth.edges) == len(unordered)
    assert len(truth.edges) < len(raw)


def test_score_cutoff_and_regnetwork(gt_dir):
    path = gt_dir / "beeline_networks" / "mouse" / "mDC-ChIP-seq-network.csv"
    raw = pd.read_csv(path)
    truth = build_ground_truth(
        GroundTruthSpec(source="file", path=str(path), format="beeline", min_score=300)
    )
    assert len(truth.edges) == len(
        raw[(raw["Score"] >= 300) & (raw["Gene1"] != raw["Gene2"])].drop_duplicates(["Gene1", "Gene2"])
    )
    reg = build_ground_truth(
        GroundTruthSpec(
            source="file", path=str(gt_dir / "regnetwork_kegg_human_signed.tsv"), format="regnetwork"
        )
    )
    assert reg.directed and set(reg.edges["sign"]) <= {-1, 0, 1}
    assert (reg.edges["sign"] == -1).any()
    with pytest.raises(DataError, match="no score column"):
        build_ground_truth(
            GroundTruthSpec(
                source="file", path=str(gt_dir / "trrust_v2_human.tsv"), format="trrust", min_score=1
            )
        )


def test_wrong_columns_give_a_clear_error(gt_dir):
    with pytest.raises(DataError, match=r"needs columns \['entrezID_A'.*missing.*found \['TF'"):
        build_ground_truth(
            GroundTruthSpec(source="file", path=str(gt_dir / "trrust_v2_human.tsv"), format="biogrid")
        )
    with pytest.raises(DataError, match="needs columns"):
        build_ground_truth(
            GroundTruthSpec(
                source="file",
                path=str(gt_dir / "trrust_v2_human.tsv"),
                format="edges",
                source_column="tf",
                target_column="target",
            )
        )
    with pytest.raises(DataError, match="not found"):
        build_ground_truth(GroundTruthSpec(source="file", path="no/such/file.tsv", format="biogrid"))


def test_generic_edges_format(tmp_path):
    path = tmp_path / "net.csv"
    path.write_text("regulator,gene,effect\nA,B,+\nB,C,-\nA,B,+\n")
    truth = build_ground_truth(
        GroundTruthSpec(
            source="file",
            path=str(path),
            format="edges",
            source_column="regulator",
            target_column="gene",
            sign_column="effect",
        )
    )
    assert truth.directed and truth.pair_set() == {"A|B", "B|C"}
    assert truth.edges.set_index("pair")["sign"].to_dict() == {"A|B": 1, "B|C": -1}


def _context(genes, table):
    context = RunContext(seed=0)
    context.interactions["pearson"] = Interactions(table, directed=False, extractor="pearson", genes=genes)
    return context


def test_overlap_report_counts_pairs_inside_the_universe(gt_dir):
    truth = build_ground_truth(ad_spec(gt_dir, "symbol", 0.3))
    genes = sorted(truth.genes)[:30] + ["NOTAGENE1", "NOTAGENE2"]
    rows, cols = np.triu_indices(len(genes), 1)
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {"source": np.array(genes)[rows], "target": np.array(genes)[cols], "score": rng.random(len(rows))}
    )
    inside = {p for p in truth.pair_set() if set(p.split("|")) <= set(genes)}
    params = {"ground_truth": ad_spec(gt_dir, "symbol", 0.3).model_dump()}
    result = AuprcEvaluator(plot=False, universe="all_genes", **params).evaluate(_context(genes, table))
    assert result.metrics["pearson/all_genes/gt_edges"] == 104
    assert result.metrics["pearson/all_genes/gt_pairs_in_universe"] == len(inside)
    assert result.metrics["pearson/all_genes/universe_genes"] == 32
    table_out = result.tables["ground_truth_overlap"]
    assert table_out.loc[0, "gt_pairs_in_universe"] == len(inside)
    nes = NesEvaluator(plot=False, permutations=50, **params).evaluate(_context(genes, table))
    assert nes.metrics["pearson/n_hits"] == len(inside)


def test_no_overlap_error_suggests_the_namespace(gt_dir):
    truth_spec = ad_spec(gt_dir, "symbol", 0.3)
    genes = ["ENSG00000142192", "ENSG00000080815", "ENSG00000000003"]
    table = pd.DataFrame({"source": genes[:2], "target": genes[1:], "score": [1.0, 0.5]})
    with pytest.raises(DataError, match="look like Ensembl IDs: set ground_truth.gene_ids: ensembl"):
        AuprcEvaluator(ground_truth=truth_spec.model_dump()).evaluate(_context(genes, table))
    # the same genes match once the ground truth is mapped to Ensembl
    mapped = truth_spec.model_copy(
        update={"gene_ids": "ensembl", "gencode": str(gt_dir / "gencode_human_ensembl_symbol_entrez.tsv")}
    )
    result = AuprcEvaluator(ground_truth=mapped.model_dump(), plot=False, universe="all_genes").evaluate(
        _context(genes + ["ENSG00000000005"], table)
    )
    assert result.metrics["pearson/all_genes/gt_pairs_in_universe"] >= 1  # APP-PSEN1


def test_case_insensitive_matching():
    truth = GroundTruth(
        pd.DataFrame({"source": ["GATA1", "SPI1"], "target": ["SPI1", "CEBPA"]}), directed=False, name="upper"
    )
    genes = ["Gata1", "Spi1", "Cebpa", "Klf1"]
    table = pd.DataFrame(
        {"source": ["Gata1", "Spi1", "Gata1"], "target": ["Spi1", "Klf1", "Cebpa"], "score": [3.0, 2.0, 1.0]}
    )
    context = _context(genes, table)
    context.ground_truth = truth
    with pytest.raises(DataError, match="case_sensitive: false"):
        AuprcEvaluator().evaluate(context)
    metrics = (
        AuprcEvaluator(ground_truth={"source": "data", "case_sensitive": False}, plot=False)
        .evaluate(context)
        .metrics
    )
    assert metrics["pearson/truth_genes/gt_pairs_in_universe"] == 2


def _file_spec(path, fmt):
    return GroundTruthSpec(source="file", path=str(path), format=fmt)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"empty.tsv is empty \(no lines\), where an edge table was expected"),
        (gzip.compress(b""), r"is empty \(no lines after decompressing\)"),
        (b"Gene1\tGene2\n", r"lists no edges \(a header line only\)"),
    ],
)
def test_empty_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "empty.tsv"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        build_ground_truth(_file_spec(path, "beeline"))


@pytest.mark.parametrize("name", ["net.tsv", "net.csv", "net.txt", "net.csv.gz"])
def test_files_are_read_by_content_whatever_their_name(tmp_path, name):
    """gzip is detected by its magic bytes, the delimiter by the header line."""
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"Gene1,Gene2,Type\nA,B,+\nB,C,-\n"))
    truth = build_ground_truth(_file_spec(path, "beeline"))
    assert truth.pair_set() == {"A|B", "B|C"}
    assert truth.edges.set_index("pair")["sign"].to_dict() == {"A|B": 1, "B|C": -1}


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        # a DoRothEA table read as TRRUST: its header became an edge, its confidence letters targets
        (
            "tf\tconfidence\ttarget\tmor\nGATA1\tA\tSPI1\t1\n",
            "trrust",
            r"does not look like a 'trrust' table: 2 of 2 rows have no mode of regulation.*"
            r"4 tab-separated fields \['tf', 'confidence', 'target', 'mor'\].*set ground_truth.format: dorothea",
        ),
        # header-less TRRUST read as BEELINE
        (
            "GATA1\tSPI1\tRepression\t12345\n",
            "beeline",
            r"does not look like a 'beeline' table.*missing \['Gene1', 'Gene2'\].*"
            r"set ground_truth.format: trrust",
        ),
        # a BEELINE table read as RegNetwork
        (
            "Gene1,Gene2\nA,B\n",
            "regnetwork",
            r"does not look like a 'regnetwork' table: 2 of 2 rows have no arrow.*comma-separated.*"
            r"set ground_truth.format: beeline",
        ),
        # nothing recognisable: the generic advice
        (
            "a b\nc d\n",
            "trrust",
            r"does not look like a 'trrust' table.*2 space-separated fields.*format: edges with source_column",
        ),
    ],
)
def test_a_file_read_with_the_wrong_format_says_what_it_looks_like(tmp_path, content, fmt, message):
    path = tmp_path / "net.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_ground_truth(_file_spec(path, fmt))


def test_no_letter_case_hint_when_case_does_not_explain_the_missing_overlap():
    truth = GroundTruth(
        pd.DataFrame({"source": ["TF", "A"], "target": ["CONFIDENCE", "B"]}), directed=True, name="x"
    )
    genes = ["Gata1", "Spi1", "Cebpa"]
    table = pd.DataFrame({"source": ["Gata1", "Spi1"], "target": ["Spi1", "Cebpa"], "score": [2.0, 1.0]})
    context = _context(genes, table)
    context.ground_truth = truth
    with pytest.raises(DataError, match="falls inside the 3 genes") as raised:
        AuprcEvaluator().evaluate(context)
    assert "case_sensitive" not in str(raised.value)


# -- a data source's named networks (ground_truth: {source: data, edges: <name>}) ---------------------


@pytest.fixture(scope="module")
def synthetic_run():
    """A small simulation with a rare state, as an evaluator sees it: the shipped ground truth and,
    by name, every network of the simulation (as the engine fills them from ground_truths())."""
    from grnx_plugins.data.synthetic import Synthetic

    source = Synthetic(
        n_cells=300,
        n_genes=40,
        n_regulators=8,
        n_rewired=4,
        n_gained=3,
        rare_state_fraction=0.1,
        n_state_edges=3,
        seed=3,
    )
    directed = source.ground_truth_directed()
    context = RunContext(seed=0)
    context.ground_truth = GroundTruth(source.ground_truth(), directed=directed, name="synthetic")
    context.ground_truths = {
        name: GroundTruth(edges, directed=directed, name=f"synthetic ({name})")
        for name, edges in source.ground_truths().items()
    }
    return source, context


def _signed_pairs(edges, sign="sign"):
    return set(zip(edges["source"].astype(str), edges["target"].astype(str), edges[sign].astype(int)))


def test_edges_selects_the_simulations_disease_edges(synthetic_run):
    from grnx_plugins.evaluators.ground_truth import resolve_ground_truth

    source, context = synthetic_run
    spec = GroundTruthSpec(source="data", edges="disease")
    truth = resolve_ground_truth(spec, context, "test")
    # the simulation's own record of what the disease rewires: 4 flipped and 3 gained edges
    planted_changes = source.network.disease_edges
    assert len(planted_changes) == 7
    assert _signed_pairs(truth.edges) == _signed_pairs(planted_changes, "disease_sign")
    planted = resolve_ground_truth(GroundTruthSpec(source="data", edges="planted"), context, "test")
    control = source.network.edges(source.network.weights_control)
    assert _signed_pairs(planted.edges) == _signed_pairs(control)
    state = resolve_ground_truth(GroundTruthSpec(source="data", edges="state"), context, "test")
    assert _signed_pairs(state.edges) == _signed_pairs(source.options.state_edges)
    # without edges: the one the source ships (ground_truth_edges, planted by default)
    assert resolve_ground_truth(GroundTruthSpec(), context, "test") is context.ground_truth


def test_one_run_scores_each_extractor_against_its_own_truth(synthetic_run):
    source, context = synthetic_run
    genes = list(source.network.genes.astype(str))
    rows, cols = np.triu_indices(len(genes), 1)
    table = pd.DataFrame(
        {
            "source": np.array(genes)[rows],
            "target": np.array(genes)[cols],
            "score": np.linspace(1, 0, len(rows)),
        }
    )
    for extractor in ("pearson_all", "pearson_diff"):
        context.interactions[extractor] = Interactions(
            table, directed=False, extractor=extractor, genes=genes
        )
    planted = AuprcEvaluator(plot=False, extractors=["pearson_all"], ground_truth={"edges": "planted"})
    disease = AuprcEvaluator(plot=False, extractors=["pearson_diff"], ground_truth={"edges": "disease"})
    planted_metrics = planted.evaluate(context).metrics
    disease_metrics = disease.evaluate(context).metrics
    assert set(planted_metrics) == {k.replace("diff", "all") for k in disease_metrics}
    assert disease_metrics["pearson_diff/truth_genes/gt_edges"] == 7
    assert planted_metrics["pearson_all/truth_genes/gt_edges"] == len(source.ground_truth())
    # nes shares the ground_truth parameter (its keys have no universe: it scores the list's items)
    nes = NesEvaluator(
        plot=False, permutations=20, extractors=["pearson_diff"], ground_truth={"edges": "disease"}
    )
    assert nes.evaluate(context).metrics["pearson_diff/gt_edges"] == 7


def test_unknown_or_unavailable_named_networks_are_clear_errors(synthetic_run):
    from pydantic import ValidationError

    table = pd.DataFrame({"source": ["g000"], "target": ["g001"], "score": [1.0]})
    context = _context(["g000", "g001"], table)
    context.ground_truths = synthetic_run[1].ground_truths
    with pytest.raises(DataError, match=r"data source's networks are \['disease', 'planted', 'state'\]"):
        AuprcEvaluator(ground_truth={"edges": "diseased"}).evaluate(context)
    bare = _context(["g000", "g001"], table)
    bare.ground_truth = GroundTruth(
        pd.DataFrame({"source": ["g000"], "target": ["g001"]}), directed=True, name="t"
    )
    with pytest.raises(DataError, match="ships no named networks"):
        AuprcEvaluator(ground_truth={"edges": "disease"}).evaluate(bare)
    with pytest.raises(ValidationError, match="needs source: data"):
        GroundTruthSpec(source="file", path="x.tsv", format="biogrid", edges="disease")
