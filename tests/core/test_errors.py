"""How a problem reads: where, then the message and its hint as sentences, punctuated once."""

from __future__ import annotations

import pytest

from grnx_core.errors import Problem, RecipeError


@pytest.mark.parametrize(
    "message,hint,rendered",
    [
        (
            "model 'mlp' reads tokenised cells, but the recipe has no tokenizer",
            "Add a 'tokenizer' section (see `grnx plugins tokenizer`).",
            "model 'mlp' reads tokenised cells, but the recipe has no tokenizer. Add a 'tokenizer' "
            "section (see `grnx plugins tokenizer`).",
        ),
        (
            "the id 'x' is used twice.",
            "Give one a different 'id'.",
            "the id 'x' is used twice. Give one a different 'id'.",
        ),
        ("Did you mean 'pearson'?", "check the name", "Did you mean 'pearson'? Check the name."),
        (
            "got 1",
            "(see `grnx plugins extractor spearman`)",
            "got 1 (see `grnx plugins extractor spearman`).",
        ),
        ("Allowed: a, b.", "(see `grnx plugins`)", "Allowed: a, b (see `grnx plugins`)."),
        ("got 'abcdef...'", "", "got 'abcdef...'."),
        ("got 'abc...'", "(see x)", "got 'abc...' (see x)."),
        ("is required but missing", "", "is required but missing."),
        ("ends in a colon:", "Fix it.", "ends in a colon. Fix it."),
    ],
)
def test_message_and_hint_are_sentences(message, hint, rendered):
    assert Problem("", message, hint=hint).render() == rendered


def test_where_comes_first():
    problem = Problem("train.epochs", "must be at least 1, got 0", source="r.yaml:5", hint="Raise it")
    assert problem.render() == "r.yaml:5: train.epochs: must be at least 1, got 0. Raise it."


def test_several_problems_are_listed_under_a_count():
    error = RecipeError([Problem("a", "bad"), Problem("b", "worse", hint="Fix b.")])
    assert str(error) == "2 problems in recipe:\n  - a: bad.\n  - b: worse. Fix b."
