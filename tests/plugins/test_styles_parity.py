"""A1111 styles semantics (A1111-SEMANTICS.md §6, PARITY-API.md ``plugins.styles``)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.styles import (
    Style,
    StyleDatabase,
    apply_style_texts,
    extract_style_text,
    merge_prompt,
)

# ---------------------------------------------------------------------------- merge_prompt


@pytest.mark.parametrize(
    ("style_text", "prompt", "expected"),
    [
        ("masterpiece", "a cat", "a cat, masterpiece"),
        ("masterpiece, {prompt}", "", "masterpiece, "),
        # Without a placeholder both parts are stripped and empty parts dropped.
        ("  masterpiece ", "  a cat  ", "a cat, masterpiece"),
        ("masterpiece", "", "masterpiece"),
        ("", "a cat", "a cat"),
        ("", "  a cat ", "a cat"),
        ("   ", "   ", ""),
        # The placeholder keeps the prompt verbatim and replaces every occurrence.
        ("{prompt}, best", "  a cat ", "  a cat , best"),
        ("{prompt} and {prompt}", "x", "x and x"),
        # Case-sensitive: {PROMPT} is ordinary text.
        ("{PROMPT}, best", "a cat", "a cat, {PROMPT}, best"),
    ],
)
def test_merge_prompt(style_text: str, prompt: str, expected: str) -> None:
    assert merge_prompt(style_text, prompt) == expected


def test_apply_style_texts_applies_in_order_to_previous_result() -> None:
    assert apply_style_texts("a cat", ["masterpiece", "{prompt}, detailed"]) == "a cat, masterpiece, detailed"
    assert apply_style_texts("a cat", ["{prompt}, detailed", "masterpiece"]) == "a cat, detailed, masterpiece"


def test_apply_style_texts_with_no_styles_keeps_prompt_untouched() -> None:
    assert apply_style_texts("  a cat ", []) == "  a cat "


def test_apply_style_texts_empty_style_strips_prompt() -> None:
    assert apply_style_texts("  a cat ", [""]) == "a cat"


# ---------------------------------------------------------------------- extract_style_text


@pytest.mark.parametrize(
    ("style_text", "prompt", "expected"),
    [
        ("masterpiece", "a cat, masterpiece", (True, "a cat")),
        ("masterpiece", "a cat,masterpiece", (True, "a cat,")),
        # Plain suffix test, no word boundary.
        ("masterpiece", "supermasterpiece", (True, "super")),
        ("masterpiece", "masterpiece", (True, "")),
        # Only one ", " is removed, and the remainder is not stripped further.
        ("masterpiece", "a cat, , masterpiece", (True, "a cat, ")),
        ("masterpiece", "a cat , masterpiece", (True, "a cat ")),
        # Both sides are stripped before testing; the remainder comes from the stripped prompt.
        ("  masterpiece  ", "  a cat, masterpiece  ", (True, "a cat")),
        # No match returns the prompt unchanged, not stripped.
        ("masterpiece", "  a cat  ", (False, "  a cat  ")),
        ("masterpiece", "masterpiece, a cat", (False, "masterpiece, a cat")),
        # Empty or whitespace-only style text matches everything and returns the stripped prompt.
        ("", "  a cat  ", (True, "a cat")),
        ("   ", " a cat ", (True, "a cat")),
        ("", "", (True, "")),
        # Placeholder: split at the first {prompt}, prefix and suffix test.
        ("masterpiece, {prompt}", "masterpiece, a cat", (True, "a cat")),
        ("{prompt}, detailed", "a cat, detailed", (True, "a cat")),
        ("best, {prompt}, detailed", "  best, a cat, detailed ", (True, "a cat")),
        ("best, {prompt}, detailed", "best, a cat", (False, "best, a cat")),
        ("best, {prompt}", "  a cat ", (False, "  a cat ")),
        # Overlapping left and right parts leave an empty remainder.
        ("x {prompt} y", "x y", (True, "")),
        # A second placeholder stays literal inside the right part.
        ("{prompt} and {prompt}", "a and {prompt}", (True, "a")),
        ("{prompt} and {prompt}", "a and a", (False, "a and a")),
        # The placeholder remainder keeps inner separators as they are.
        ("{prompt}, detailed", "a cat, , detailed", (True, "a cat, ")),
        # The style text is stripped, so its inner whitespace next to {prompt} counts.
        ("  {prompt} , hd  ", "a cat , hd", (True, "a cat")),
        ("{prompt}", "  a cat  ", (True, "a cat")),
        # Case-sensitive placeholder: {PROMPT} is a plain suffix.
        ("{PROMPT}", "a cat, {PROMPT}", (True, "a cat")),
    ],
)
def test_extract_style_text(style_text: str, prompt: str, expected: tuple[bool, str]) -> None:
    assert extract_style_text(style_text, prompt) == expected


@given(style=st.text(max_size=20), prompt=st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_extract_undoes_plain_merge_of_stripped_texts(style: str, prompt: str) -> None:
    """A merged prompt always contains the style, so extraction matches."""
    merged = merge_prompt(style, prompt)
    matched, _ = extract_style_text(style, merged)
    assert matched


# ------------------------------------------------------------------------------- database

STYLES_CSV = (
    "name,prompt,negative_prompt\r\n"
    'Quality,"masterpiece, best quality","lowres, blurry"\r\n'
    "#Disabled,commented out,nothing\r\n"
    'Wrap,"photo of {prompt}, 35mm",\r\n'
    'Multi,"line one\nline two",neg\r\n'
    "Spaced,   leading spaces skipped,   neg\r\n"
    'Quoted,"she said ""hi""",\r\n'
)


def test_from_csv_reads_rows_in_file_order_and_drops_comments() -> None:
    db = StyleDatabase.from_csv(STYLES_CSV)
    assert db.styles == [
        Style("Quality", "masterpiece, best quality", "lowres, blurry"),
        Style("Wrap", "photo of {prompt}, 35mm", ""),
        Style("Multi", "line one\nline two", "neg"),
        Style("Spaced", "leading spaces skipped", "neg"),
        Style("Quoted", 'she said "hi"', ""),
    ]


def test_from_csv_tolerates_bom_and_lf_endings() -> None:
    db = StyleDatabase.from_csv("\ufeffname,prompt,negative_prompt\na,b,c\n")
    assert db.styles == [Style("a", "b", "c")]


def test_from_csv_spaces_after_delimiters_in_header_are_skipped() -> None:
    db = StyleDatabase.from_csv("name, prompt, negative_prompt\na, b, c\n")
    assert db.styles == [Style("a", "b", "c")]


def test_from_csv_accepts_old_two_column_format() -> None:
    db = StyleDatabase.from_csv("name,text\nold,  masterpiece\n#x,y\n")
    assert db.styles == [Style("old", "masterpiece", "")]


def test_from_csv_comment_marker_only_at_start_of_name() -> None:
    db = StyleDatabase.from_csv('name,prompt,negative_prompt\n" #not a comment",a,b\nx#y,c,d\n')
    assert [s.name for s in db.styles] == [" #not a comment", "x#y"]


def test_from_csv_later_row_replaces_texts_but_keeps_first_position() -> None:
    db = StyleDatabase.from_csv("name,prompt,negative_prompt\na,1,1\nb,2,2\na,3,3\n")
    assert db.styles == [Style("a", "3", "3"), Style("b", "2", "2")]


def test_from_csv_short_rows_leave_missing_texts_empty_and_blank_lines_are_skipped() -> None:
    db = StyleDatabase.from_csv("name,prompt,negative_prompt\n\nonly name\nname and prompt,p\n")
    assert db.styles == [Style("only name", "", ""), Style("name and prompt", "p", "")]


def test_from_csv_extra_columns_are_ignored() -> None:
    db = StyleDatabase.from_csv("name,prompt,negative_prompt,extra\na,b,c,d,e\n")
    assert db.styles == [Style("a", "b", "c")]


def test_from_csv_empty_content_gives_empty_database() -> None:
    assert StyleDatabase.from_csv("").styles == []
    assert StyleDatabase.from_csv("name,prompt,negative_prompt\r\n").styles == []


def test_from_csv_rejects_rows_without_name_or_prompt_column() -> None:
    with pytest.raises(ValueError):
        StyleDatabase.from_csv("title,prompt\na,b\n")
    with pytest.raises(ValueError):
        StyleDatabase.from_csv("name,negative_prompt\na,b\n")


def test_to_csv_writes_a1111_header_and_minimal_quoting() -> None:
    db = StyleDatabase([Style("a", "b, c", ""), Style("d", 'say "x"', "e")])
    assert db.to_csv() == ('name,prompt,negative_prompt\r\na,"b, c",\r\nd,"say ""x""",e\r\n')


@pytest.mark.parametrize(
    "style",
    [
        Style("plain", "masterpiece", "lowres"),
        Style("commas, quotes", 'a, "b", c', '"'),
        Style("newlines", "line\none\r\ntwo\rthree", "\n"),
        Style(" leading", "  spaced  ", " x"),
        Style("", "", ""),
        Style("trailing ", "t ", "\t tab"),
        Style("unicode ✓", "猫, {prompt}", "ß"),
    ],
)
def test_to_csv_round_trips_through_from_csv(style: Style) -> None:
    db = StyleDatabase([style, Style("other", "o", "p")])
    assert StyleDatabase.from_csv(db.to_csv()) == db


_name = st.text(max_size=12).filter(lambda s: not s.startswith("#"))


@given(st.lists(st.builds(Style, _name, st.text(max_size=20), st.text(max_size=20)), max_size=5))
@settings(max_examples=300, deadline=None)
def test_to_csv_round_trip_property(styles: list[Style]) -> None:
    db = StyleDatabase(styles)
    assert StyleDatabase.from_csv(db.to_csv()) == db


def test_database_construction_merges_duplicate_names() -> None:
    db = StyleDatabase([Style("a", "1", ""), Style("b", "2", ""), Style("a", "3", "")])
    assert db.styles == [Style("a", "3", ""), Style("b", "2", "")]


def _db() -> StyleDatabase:
    return StyleDatabase.from_csv(
        "name,prompt,negative_prompt\n"
        "Quality,masterpiece,lowres\n"
        'Detail,"{prompt}, highly detailed",\n'
        "NegOnly,,bad hands\n"
        "Empty,,\n"
    )


def test_apply_styles_both_texts_in_given_order() -> None:
    db = _db()
    assert db.apply("a cat", "blurry", ["Quality", "Detail"]) == (
        "a cat, masterpiece, highly detailed",
        "blurry, lowres",
    )
    assert db.apply("a cat", "blurry", ["Detail", "Quality"]) == (
        "a cat, highly detailed, masterpiece",
        "blurry, lowres",
    )


def test_apply_unknown_name_acts_as_empty_style() -> None:
    assert _db().apply("  a cat ", " blurry ", ["Nope"]) == ("a cat", "blurry")


def test_apply_no_names_leaves_texts_unchanged() -> None:
    assert _db().apply("  a cat ", " blurry ", []) == ("  a cat ", " blurry ")


def test_extract_recovers_names_in_application_order() -> None:
    db = _db()
    prompt, negative = db.apply("a cat", "blurry", ["Quality", "Detail", "NegOnly"])
    assert (prompt, negative) == ("a cat, masterpiece, highly detailed", "blurry, lowres, bad hands")
    # Peeled: Detail (Quality's negative does not match yet), then NegOnly (the scan restarts
    # at Quality, which still fails on the negative), then Quality. Reversed, that is not the
    # order applied: extraction recovers an order that reproduces the texts, as A1111 does.
    assert db.extract(prompt, negative) == (["Quality", "NegOnly", "Detail"], "a cat", "blurry")
    assert db.apply("a cat", "blurry", ["Quality", "NegOnly", "Detail"]) == (prompt, negative)


def test_extract_restarts_scan_at_first_candidate() -> None:
    db = _db()
    prompt, negative = db.apply("a cat", "blurry", ["Quality", "Detail"])
    assert db.extract(prompt, negative) == (["Quality", "Detail"], "a cat", "blurry")


def test_extract_needs_both_texts_to_match() -> None:
    db = _db()
    # Quality's prompt matches but its negative does not, so nothing changes.
    assert db.extract("a cat, masterpiece", "blurry") == ([], "a cat, masterpiece", "blurry")


def test_extract_never_extracts_a_style_with_both_texts_empty() -> None:
    db = StyleDatabase([Style("Empty", "", "")])
    assert db.extract("  a cat ", " neg ") == ([], "  a cat ", " neg ")


def test_extract_whitespace_style_is_eligible_and_matches_everything() -> None:
    db = StyleDatabase([Style("Space", " ", "")])
    assert db.extract("  a cat ", " neg ") == (["Space"], "a cat", "neg")


def test_extract_empty_prompt_style_matches_on_negative_and_strips_prompt() -> None:
    db = StyleDatabase([Style("NegOnly", "", "bad hands")])
    assert db.extract("  a cat ", "blurry, bad hands") == (["NegOnly"], "a cat", "blurry")
    assert db.extract("  a cat ", "blurry") == ([], "  a cat ", "blurry")


def test_extract_each_style_at_most_once() -> None:
    db = StyleDatabase([Style("Q", "masterpiece", "")])
    assert db.extract("a, masterpiece, masterpiece", "") == (["Q"], "a, masterpiece", "")


def test_extract_first_match_in_database_order_wins() -> None:
    # Both styles end the prompt; the earlier one in the file is peeled first.
    db = StyleDatabase([Style("Short", "piece", ""), Style("Long", "masterpiece", "")])
    assert db.extract("a cat, masterpiece", "") == (["Short"], "a cat, master", "")


def test_extract_uses_position_of_first_row_for_duplicates() -> None:
    db = StyleDatabase.from_csv("name,prompt,negative_prompt\nA,x,\nB,y,\nA,y,\n")
    # A (now "y") stays first, so it wins against B for the suffix "y".
    assert db.extract("p, y", "") == (["A"], "p", "")
