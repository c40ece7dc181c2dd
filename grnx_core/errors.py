"""User-facing errors: what went wrong, where, and what to do about it.

Every error a user can fix by changing their recipe, data or command derives from
:class:`GrnxError`; the CLI prints its message and exits with status 2, without a traceback
unless ``--debug`` is given. Anything else is a bug in grnx or a plugin and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class GrnxError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""

    exit_code = 2


class PluginError(GrnxError):
    """A component could not be found, loaded, or registered."""


class DataError(GrnxError):
    """Input data does not have the shape, values or annotations a component needs."""


@dataclass(frozen=True)
class Problem:
    """One problem found while loading or validating a recipe.

    ``path`` is the dotted YAML path (also the override path), ``source`` the file it came from
    or ``"override 'a.b=c'"`` when a command-line override set it.
    """

    path: str
    message: str
    source: str = ""
    hint: str = ""

    def render(self) -> str:
        """``source: path: message. Hint.``: the message and its hint as sentences, each ended once."""
        where = f"{self.source}: " if self.source else ""
        at = f"{self.path}: " if self.path else ""
        text = self.message.strip()
        hint = self.hint.strip()
        if hint.startswith("("):  # a parenthetical such as "(see `grnx plugins ...`)" ends the message
            text = f"{text[:-1] if text.endswith('.') and not text.endswith('...') else text} {hint}"
        elif hint:
            text = f"{_end_sentence(text)} {hint[0].upper()}{hint[1:]}"
        return f"{where}{at}{_end_sentence(text)}"


def _end_sentence(text: str) -> str:
    """``text`` ending in exactly one full stop, unless it already ends a sentence (or an ellipsis)."""
    if not text or text.endswith((".", "?", "!")):
        return text
    return text.rstrip(",;: ") + "."


class RecipeError(GrnxError):
    """A recipe failed to load or validate; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        header = f"{count} problem{'s' if count != 1 else ''} in recipe:"
        lines = [header] + [f"  - {p.render()}" for p in self.problems]
        super().__init__("\n".join(lines) if count > 1 else self.problems[0].render())
