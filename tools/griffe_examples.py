"""Griffe extension for the docs build: a Google-style ``Example:`` section renders as code.

Griffe's Google parser knows ``Examples:`` (plural) as a section whose ``>>>`` lines become code blocks, but
takes ``Example:`` (singular, the spelling this package's docstrings use) for an admonition whose body is
Markdown: the ``>>>`` prompts turn into nested block quotes and the lines run together into one paragraph.
This extension renames the singular title before the docstring is parsed, so both spellings render the
same way. Loaded by mkdocstrings (``extensions`` in ``mkdocs.yml``); nothing in ``eah_interp`` imports it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


def pluralise_example_titles(text: str) -> str:
    """``text`` with every line that is exactly ``Example:`` (any indentation) renamed ``Examples:``."""
    return _SINGULAR.sub(r"\g<indent>Examples:", text)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        """Rewrite the docstring of each object as it is loaded (before any parsing)."""
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = pluralise_example_titles(docstring.value)
