"""Extra-network tags such as ``<lora:name:0.8>`` and ``<hypernet:name>`` (A1111 §5).

Only the syntax lives here: tags are cut out of the prompt and their arguments split.
What a multiplier means, and which networks are activated for a batch, is for the code
that applies the networks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["ExtraNetworkParams", "parse"]

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass
class ExtraNetworkParams:
    """The arguments of one tag occurrence, both raw and split into kinds."""

    items: list[str] = field(default_factory=list)  # the ':'-separated arguments after the tag name
    positional: list[str] = field(default_factory=list)  # items that are not name=value
    named: dict[str, str] = field(default_factory=dict)  # items of the form name=value

    @classmethod
    def from_items(cls, items: list[str]) -> ExtraNetworkParams:
        """An item is named only when ``=`` splits it into exactly two parts, so
        ``a=b=c`` stays positional, like A1111 treats it."""
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in items:
            pieces = item.split("=", 2)
            if len(pieces) == 2:
                named[pieces[0]] = pieces[1]
            else:
                positional.append(item)
        return cls(items=list(items), positional=positional, named=named)


def parse(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    """Remove every ``<name:args>`` tag from ``prompt``.

    Returns the remaining text (the spaces around a tag stay, A1111 does not tidy them)
    and, per tag name as written, the occurrences in prompt order.
    """
    found: dict[str, list[ExtraNetworkParams]] = {}

    def _collect(match: re.Match[str]) -> str:
        found.setdefault(match.group(1), []).append(ExtraNetworkParams.from_items(match.group(2).split(":")))
        return ""

    return _TAG.sub(_collect, prompt), found
