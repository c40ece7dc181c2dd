"""`grnx export tokens RUN_ID OUT --format geneformer`, and where `grnx run` says its tokens are."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from grnx_core.cli import main
from grnx_core.data_types import TokenizedCells
from grnx_core.engine import TOKENS_PATH_TAG
from grnx_core.testing import write_fixture_files
from grnx_core.tracking import Tracker
from grnx_plugins.tokenizers.export import read_geneformer_dataset

RECIPE = """
schema_version: 1
name: export_cli
data: {{name: h5ad, params: {{path: {h5ad}}}, label_key: label, donor_key: donor}}
tokenizer:
  name: rank_value
  params: {{token_dictionary: {tokens}, gene_medians: fit, gene_id_key: ensembl_id, model_input_size: 18{extra}}}
"""


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    return write_fixture_files(tmp_path_factory.mktemp("fixture"))


def write_recipe(folder: Path, files, extra: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(
        textwrap.dedent(RECIPE.format(h5ad=files.h5ad, tokens=files.token_dictionary, extra=extra))
    )
    return path


def run(recipe: Path, capsys, *options: str) -> tuple[str, str]:
    """``grnx run``; the run id and what it printed on stderr."""
    assert main(["run", str(recipe), *options]) == 0
    captured = capsys.readouterr()
    match = re.search(r"^run (\S+): FINISHED", captured.out, re.MULTILINE)
    assert match is not None, captured.out
    return match.group(1), captured.err


def test_run_says_where_the_tokens_are_and_export_writes_them(tmp_path, capsys, fixture_files):
    recipe = write_recipe(tmp_path, fixture_files)
    run_id, err = run(recipe, capsys)
    tag = Tracker().client.get_run(run_id).data.tags[TOKENS_PATH_TAG]
    assert f"[grnx] tokens: {tag}" in err
    tokens = TokenizedCells.load(Path(tag))
    assert tokens.n_cells == 60 and tokens.metadata["tokenizer"] == "rank_value"

    out = tmp_path / "cells.dataset"
    assert (
        main(["export", "tokens", run_id, str(out), "--format", "geneformer", "--rename", "label=disease"])
        == 0
    )
    assert f"wrote {out}" in capsys.readouterr().out
    rows = read_geneformer_dataset(out)
    carried = list(tokens.obs.columns)  # the data roles (and the split), in the engine's order
    assert carried[:2] == ["label", "donor"]
    assert list(rows.columns) == ["input_ids", "disease", *carried[1:], "length"]
    assert [ids.tolist() for ids in rows["input_ids"]] == [tokens.cell(i)[0].tolist() for i in range(60)]
    assert rows["input_ids"][0].dtype == np.int32  # V2 tokens, as Geneformer writes them
    assert rows["disease"].tolist() == tokens.obs["label"].astype(str).tolist()
    assert rows["length"].tolist() == tokens.lengths.tolist()

    # A rerun served from the cache carries the same tag; OUT is not replaced without --force.
    rerun_id, err = run(recipe, capsys)
    assert "tokenize: cached" in err
    assert Tracker().client.get_run(rerun_id).data.tags[TOKENS_PATH_TAG] == tag
    assert main(["export", "tokens", rerun_id, str(out), "--format", "geneformer"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "tokens",
                rerun_id,
                str(out),
                "--format",
                "geneformer",
                "--force",
                "--columns",
                "donor",
            ]
        )
        == 0
    )
    assert list(read_geneformer_dataset(out).columns) == ["input_ids", "donor", "length"]


def test_export_errors_say_what_to_do(tmp_path, capsys, fixture_files):
    out = str(tmp_path / "x.dataset")
    assert main(["export", "tokens", "0123456789abcdef", out, "--format", "geneformer"]) == 2
    assert "no run '0123456789abcdef' in the tracking store" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, fixture_files)
    uncached_id, err = run(recipe, capsys, "--no-cache")
    assert "[grnx] tokens: not kept (the cache is off)" in err
    assert main(["export", "tokens", uncached_id, out, "--format", "geneformer"]) == 2
    assert "kept no tokens" in capsys.readouterr().err and not Path(out).exists()
    run_id, _ = run(recipe, capsys)
    assert main(["export", "tokens", run_id, out, "--format", "geneformer", "--rename", "label"]) == 2
    assert "--rename takes OBS_COLUMN=DATASET_COLUMN" in capsys.readouterr().err
    assert main(["export", "tokens", run_id, out, "--format", "geneformer", "--columns", "batch"]) == 2
    assert "'batch' are not carried" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the format is required
        main(["export", "tokens", run_id, out])
    capsys.readouterr()
    # The cache entry removed: the message says so.
    tag = Path(Tracker().client.get_run(run_id).data.tags[TOKENS_PATH_TAG])
    moved = tag.with_name("moved")
    tag.rename(moved)
    try:
        assert main(["export", "tokens", run_id, out, "--format", "geneformer"]) == 2
        assert "which no longer exists" in capsys.readouterr().err
    finally:
        moved.rename(tag)


def test_recipe_export_option_logs_the_dataset(tmp_path, capsys, fixture_files):
    recipe = write_recipe(tmp_path, fixture_files, extra=", export: geneformer")
    run_id, _ = run(recipe, capsys)
    tracker = Tracker()
    logged = [a.path for a in tracker.client.list_artifacts(run_id, "tokens")]
    assert logged == ["tokens/geneformer.dataset"]
    entry = Path(tracker.client.get_run(run_id).data.tags[TOKENS_PATH_TAG]).parent
    assert not (entry / "exports").exists()  # written once, kept as the recorded artifact only
    dataset = Path(tracker.client.download_artifacts(run_id, "tokens/geneformer.dataset", str(tmp_path)))
    rows = read_geneformer_dataset(dataset)
    tokens = TokenizedCells.load(entry / "tokens")
    assert list(rows.columns) == ["input_ids", *tokens.obs.columns, "length"]
    assert rows["length"].tolist() == tokens.lengths.tolist()
    assert [ids.tolist() for ids in rows["input_ids"]] == [tokens.cell(i)[0].tolist() for i in range(60)]
    # Served from the cache, the artifact is logged again to the new run.
    rerun_id, err = run(recipe, capsys)
    assert "tokenize: cached" in err
    assert [a.path for a in tracker.client.list_artifacts(rerun_id, "tokens")] == [
        "tokens/geneformer.dataset"
    ]
