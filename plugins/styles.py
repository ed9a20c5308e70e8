"""Prompt styles with A1111's ``styles.csv`` semantics (A1111-SEMANTICS.md §6).

The text functions are pure and live at module level so the parity check and the
plugin's hook implementations can share them. Styling must round-trip through an
infotext: ``apply`` builds the final prompt, ``extract`` recovers the style names when a
user pastes that infotext back ("Apply if any"), so both follow A1111 to the character.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"
CSV_FIELDS = ("name", "prompt", "negative_prompt")
_BOM = "\ufeff"


def merge_prompt(style_text: str, prompt: str) -> str:
    """One style text applied to ``prompt``.

    A placeholder style wraps the prompt verbatim (whitespace kept, so a style like
    ``"masterpiece, {prompt}"`` stays predictable); any other style is appended after a
    comma, and empty parts are dropped so no dangling ``", "`` appears.
    """
    if PROMPT_PLACEHOLDER in style_text:
        return style_text.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_style_texts(prompt: str, style_texts: Sequence[str]) -> str:
    """Apply several style texts in order, each to the result of the previous one."""
    for style_text in style_texts:
        prompt = merge_prompt(style_text, prompt)
    return prompt


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """Undo one ``merge_prompt``: ``(True, remainder)`` on a match, else ``(False, prompt)``.

    Matching works on stripped texts because applying a style strips the prompt; the
    unmatched prompt is returned untouched so a failed test changes nothing.
    """
    stripped_prompt = prompt.strip()
    stripped_style = style_text.strip()
    if PROMPT_PLACEHOLDER in stripped_style:
        left, right = stripped_style.split(PROMPT_PLACEHOLDER, 1)
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            # Overlapping left/right parts give an empty slice, which is A1111's answer too.
            return True, stripped_prompt[len(left) : len(stripped_prompt) - len(right)]
        return False, prompt
    if stripped_prompt.endswith(stripped_style):
        remainder = stripped_prompt[: len(stripped_prompt) - len(stripped_style)]
        if remainder.endswith(", "):
            remainder = remainder[:-2]
        return True, remainder
    return False, prompt


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


def _extract_style(style: Style, prompt: str, negative_prompt: str) -> tuple[str, str] | None:
    """Both remainders if ``style`` explains both texts, else ``None``.

    A style with two empty texts would match every prompt, so it is never extracted;
    only the empty string counts as empty here (a whitespace style is eligible).
    """
    if not style.prompt and not style.negative_prompt:
        return None
    matched, new_prompt = extract_style_text(style.prompt, prompt)
    if not matched:
        return None
    matched, new_negative = extract_style_text(style.negative_prompt, negative_prompt)
    if not matched:
        return None
    return new_prompt, new_negative


def _dedupe(styles: Iterable[Style]) -> list[Style]:
    """Later styles with a known name replace its texts but keep the first position."""
    by_name: dict[str, Style] = {}
    for style in styles:
        by_name[style.name] = style
    return list(by_name.values())


def _row_text(row: dict[str | None, object], key: str) -> str:
    """A cell as text; short rows leave cells as ``None``, which styles treat as empty."""
    value = row.get(key)
    return value if isinstance(value, str) else ""


def _style_from_row(row: dict[str | None, object]) -> Style | None:
    """The style a CSV row defines, or ``None`` for a '#' comment row.

    Like A1111, a header without the needed columns only fails once a row uses it.
    """
    if "name" not in row:
        raise ValueError("styles CSV has no 'name' column")
    name = _row_text(row, "name")
    if name.startswith("#"):
        return None
    # Files written before negative prompts existed use a two-column "name,text" layout.
    prompt_key = "prompt" if "prompt" in row else "text"
    if prompt_key not in row:
        raise ValueError("styles CSV has neither a 'prompt' nor a 'text' column")
    return Style(name, _row_text(row, prompt_key), _row_text(row, "negative_prompt"))


def _needs_full_quoting(values: Sequence[str]) -> bool:
    """Whether minimal quoting would lose text when read back.

    The reader skips spaces after a delimiter, so a value that starts with a space only
    survives inside quotes; ``csv`` quotes minimally otherwise.
    """
    return any(value.startswith(" ") for value in values)


@dataclass
class StyleDatabase:
    """Named styles in file order, as A1111 loads them from ``styles.csv``.

    Duplicate names are merged on construction the way A1111's loader merges rows.
    """

    styles: list[Style] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.styles = _dedupe(self.styles)

    @classmethod
    def from_csv(cls, text: str) -> StyleDatabase:
        """Styles from CSV *content* with A1111's reader quirks.

        A leading BOM is dropped, spaces after delimiters are skipped, quoted cells may
        span lines, '#' rows are comments, a repeated name replaces the earlier texts.
        Raises ``ValueError`` when rows exist but the header lacks ``name`` or both
        ``prompt`` and ``text``.
        """
        if text.startswith(_BOM):
            text = text[len(_BOM) :]
        # newline="" hands line endings to the csv module, as A1111 opens the file.
        reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
        styles = [style for row in reader if (style := _style_from_row(row)) is not None]
        return cls(styles)

    def to_csv(self) -> str:
        """The database as A1111's ``styles.csv`` content (``csv`` excel dialect, CRLF).

        ``from_csv`` reads it back unchanged, except styles whose name starts with '#'
        (A1111 reads those as comments). A1111 saves the file as UTF-8 with a BOM; the
        encoding is left to whoever writes the file.
        """
        buffer = io.StringIO(newline="")
        minimal = csv.writer(buffer)
        quote_all = csv.writer(buffer, quoting=csv.QUOTE_ALL)
        minimal.writerow(CSV_FIELDS)
        for style in self.styles:
            row = (style.name, style.prompt, style.negative_prompt)
            (quote_all if _needs_full_quoting(row) else minimal).writerow(row)
        return buffer.getvalue()

    def apply(self, prompt: str, negative_prompt: str, names: Sequence[str]) -> tuple[str, str]:
        """Both texts styled by ``names`` in order; an unknown name acts as an empty style."""
        by_name = {style.name: style for style in self.styles}
        chosen = [by_name.get(name) for name in names]
        return (
            apply_style_texts(prompt, [style.prompt if style is not None else "" for style in chosen]),
            apply_style_texts(
                negative_prompt, [style.negative_prompt if style is not None else "" for style in chosen]
            ),
        )

    def extract(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """Style names recovered from styled texts ("Apply if any"), in application order.

        The first matching style in database order is peeled off and the scan restarts
        from the top; outer styles come off first, so the names are returned reversed.
        """
        candidates = list(self.styles)
        extracted: list[str] = []
        while True:
            for index, style in enumerate(candidates):
                remainders = _extract_style(style, prompt, negative_prompt)
                if remainders is not None:
                    prompt, negative_prompt = remainders
                    extracted.append(style.name)
                    del candidates[index]
                    break
            else:
                break
        extracted.reverse()
        return extracted, prompt, negative_prompt
