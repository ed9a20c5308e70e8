"""Tests for pipeline.prompts: emphasis (§2), prompt editing (§3) and AND (§4).

Expected values come from A1111-SEMANTICS.md, PARITY-API.md and, for the grammar's
corner cases, from running the §3.1 grammar under lark (recorded here as literals).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import prompt_editing, prompt_editing_grammar
from pipeline.errors import PromptSyntaxError
from pipeline.prompts import parse_attention, prompt_schedules, scheduled_at, split_and
from tests.conftest import fuzz_examples

# Text strategies biased toward the syntax: brackets, separators, escapes, numbers, keywords.
_SYNTAX_PIECES = [
    "(", ")", "[", "]", ":", "|", "\\", "\\\\", "\\(", "\\]", " ", "\n", "\t",
    "a", "b", "cat", "AND", "BREAK", " BREAK ", "0", "1", "3", "1.", ".5", "1.2", "1.2.3",
    ".", "..", "e", "1e3", "1e999", "+", "-", "-1", "+3", ":3]", ": 0.5 ]", ":1.0]", "0.01",
    "٣", "\u00a0", "[a:3]", "[a|b]", "(x)", "[c:d:0.5]", "]]", "))", "():",
]  # fmt: skip
_syntax_text = st.lists(
    st.one_of(st.sampled_from(_SYNTAX_PIECES), st.text(max_size=3)),
    max_size=40,
).map("".join)


def _weights(result: list[tuple[str, float]]) -> list[float]:
    return [weight for _, weight in result]


# ---------------------------------------------------------------------------------------
# parse_attention


class TestParseAttention:
    def test_spec_example_sentence(self) -> None:
        assert parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ]

    def test_nested_weights_multiply_innermost_first(self) -> None:
        assert parse_attention("((a:1.2):1.5)") == [("a", 1.7999999999999998)]

    def test_round_inside_square_is_exactly_one(self) -> None:
        assert parse_attention("([a])") == [("a", 1.0)]

    def test_square_uses_multiplied_reciprocal(self) -> None:
        # 1/1.1 is computed once and multiplied: [[a]] is (1/1.1)**2 by multiplication.
        assert parse_attention("[[a]]") == [("a", 0.9090909090909091 * 0.9090909090909091)]
        assert parse_attention("((a))") == [("a", 1.2100000000000002)]

    @pytest.mark.parametrize(
        ("prompt", "expected"),
        [
            ("(a:1.5", [("a:1.5", 1.1)]),  # unclosed paren: the weight is text
            ("a:1.5)", [("a:1.5)", 1.0)]),  # weight close without an open paren
            ("(a:1e3)", [("a:1e3", 1.1)]),  # exponents are not weights
            ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),
            ("\\a", [("a", 1.0)]),  # a lone backslash disappears
            ("\\(a\\)", [("(a)", 1.0)]),
            ("a\\", [("a", 1.0)]),
            ("\\", [("", 1.0)]),
            ("", [("", 1.0)]),
            ("()", [("", 1.0)]),
            ("a ) ] b", [("a ) ] b", 1.0)]),
            ("(a: 2 )", [("a", 2.0)]),
            ("(a:-1)", [("a", -1.0)]),
            ("(a:+.5)", [("a", 0.5)]),
            ("(a:1.)", [("a", 1.0)]),
            ("a: b", [("a: b", 1.0)]),
        ],
    )
    def test_spec_edge_cases(self, prompt: str, expected: list[tuple[str, float]]) -> None:
        assert parse_attention(prompt) == expected

    def test_unclosed_brackets_close_round_first_then_square(self) -> None:
        assert parse_attention("[(a") == [("a", 1.1 * 0.9090909090909091)]
        assert parse_attention("((a") == [("a", 1.1 * 1.1)]

    def test_break_outside_brackets(self) -> None:
        assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]

    def test_break_inside_brackets_is_scaled(self) -> None:
        assert parse_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]

    def test_double_break_keeps_empty_piece(self) -> None:
        assert parse_attention("a BREAK BREAK b") == [
            ("a", 1.0),
            ("BREAK", -1.0),
            ("", 1.0),
            ("BREAK", -1.0),
            ("b", 1.0),
        ]

    @pytest.mark.parametrize("prompt", ["BREAKING news", "a break b", "aBREAK b", "BRE\\AK"])
    def test_break_needs_whole_uppercase_word(self, prompt: str) -> None:
        assert all(weight == 1.0 for weight in _weights(parse_attention(prompt)))

    def test_weights_are_floats(self) -> None:
        for _, weight in parse_attention("a BREAK (b:2) [c] \\"):
            assert type(weight) is float

    def test_adjacent_equal_weights_merge(self) -> None:
        assert parse_attention("(a)(b) c") == [("ab", 1.1), (" c", 1.0)]

    @pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a: .. )", "x (y:+.)"])
    def test_unparsable_weight_raises(self, prompt: str) -> None:
        with pytest.raises(PromptSyntaxError):
            parse_attention(prompt)

    def test_unparsable_weight_without_open_paren_is_text(self) -> None:
        assert parse_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]

    def test_unicode_digits_are_weights(self) -> None:
        # A1111's lexer uses \d, so Arabic-Indic digits form a weight Python can read.
        assert parse_attention("(a:\u0662)") == [("a", 2.0)]

    @settings(max_examples=fuzz_examples(10_000), deadline=None)
    @given(_syntax_text)
    def test_fuzz_only_prompt_syntax_error_escapes(self, text: str) -> None:
        try:
            result = parse_attention(text)
        except PromptSyntaxError:
            return
        assert result
        for piece, weight in result:
            assert type(piece) is str
            assert type(weight) is float


# ---------------------------------------------------------------------------------------
# prompt_schedules


def _one(prompt: str, steps: int, **kwargs: object) -> list[tuple[int, str]]:
    (schedule,) = prompt_schedules([prompt], steps, **kwargs)
    return [tuple(entry) for entry in schedule]


class TestPromptSchedules:
    def test_parity_example(self) -> None:
        assert prompt_schedules(["[a:b:10]"], 20) == [[(10, "a"), (20, "b")]]

    def test_types_are_int_and_str(self) -> None:
        for step, text in _one("[a:b:0.5] [c|d]", 7):
            assert type(step) is int
            assert type(text) is str

    @pytest.mark.parametrize(
        ("prompt", "expected"),
        [
            ("[a:b:1.0]", [(20, "a")]),  # 1.0 means all steps
            ("[a:b:3.]", [(20, "a")]),  # '3.' is a fraction
            ("[a:b:0]", [(20, "b")]),
            ("[a:b:-1]", [(20, "b")]),
            ("[a:b:0.01]", [(20, "b")]),  # truncates to 0
            ("[a:b:25]", [(20, "a")]),  # clamps to steps
            ("[a:b:+3]", [(3, "a"), (20, "b")]),
            ("[a:b:.5]", [(10, "a"), (20, "b")]),
            ("[a:b:1e1]", [(10, "a"), (20, "b")]),  # no dot: an integer step
            ("[a:b: 5 ]", [(5, "a"), (20, "b")]),
            ("[a:b:\t5\n]", [(5, "a"), (20, "b")]),
            ("[a:5]", [(5, ""), (20, "a")]),  # a missing "from" is empty
            ("[:a:5]", [(5, ""), (20, "a")]),
            ("[a::5]", [(5, "a"), (20, "")]),
            ("a [b:3]", [(3, "a "), (20, "a b")]),
        ],
    )
    def test_boundary_steps(self, prompt: str, expected: list[tuple[int, str]]) -> None:
        assert _one(prompt, 20) == expected

    def test_alternation_cycles_every_step(self) -> None:
        assert _one("[a|b|c]", 5) == [(1, "a"), (2, "b"), (3, "c"), (4, "a"), (5, "b")]

    def test_alternation_with_empty_option(self) -> None:
        assert _one("[fe|]male", 4) == [(1, "female"), (2, "male"), (3, "female"), (4, "male")]
        assert _one("[a||b]", 3) == [(1, "a"), (2, ""), (3, "b")]

    def test_surviving_brackets_are_emphasis(self) -> None:
        assert _one("[[[b]]:2]", 10) == [(2, ""), (10, "[[b]]")]

    def test_emphasis_is_kept_verbatim_around_editing(self) -> None:
        assert _one("(a:[b:c:3])", 10) == [(3, "(a:b)"), (10, "(a:c)")]
        assert _one("[(a:1.2):b:5]", 10) == [(5, "(a:1.2)"), (10, "b")]
        assert _one("[x:(a:1.2):3]", 10) == [(3, "x"), (10, "(a:1.2)")]
        assert _one("((a:1.2) [b|c])", 2) == [(1, "((a:1.2) b)"), (2, "((a:1.2) c)")]

    def test_nested_editing(self) -> None:
        assert _one("[a:[b:c:3]:5]", 10) == [(3, "a"), (5, "a"), (10, "c")]
        assert _one("[[a:b:3]:4:5]", 10) == [(3, "a"), (5, "b"), (10, "4")]
        assert _one("[x[a:b:3]y:4]", 10) == [(3, ""), (4, ""), (10, "xby")]
        assert _one("[a|[b:3]]", 4) == [(1, "a"), (2, ""), (3, "a"), (4, "b")]
        assert _one("[[a:b:3]|c]", 6) == [(1, "a"), (2, "c"), (3, "a"), (4, "c"), (5, "b"), (6, "c")]
        assert _one("[a|(b:1.1)]", 2) == [(1, "a"), (2, "(b:1.1)")]

    def test_stray_brackets_and_colons_are_kept(self) -> None:
        assert _one("((a][:b:c [d:3]", 10) == [(3, "((a][:b:c "), (10, "((a][:b:c d")]
        assert _one("[[a:b:5]", 10) == [(5, "[a"), (10, "[b")]
        assert _one(":[a:b:3]", 10) == [(3, ":a"), (10, ":b")]
        assert _one("[a:b:3] ]", 10) == [(3, "a ]"), (10, "b ]")]
        assert _one("a [b:c:3] d]", 10) == [(3, "a b d]"), (10, "a c d]")]

    @pytest.mark.parametrize(
        ("prompt", "steps", "expected"),
        [
            # A construct directly followed by strays is a tie in the grammar; the
            # expected values are lark 1.3.1's (lark 1.1.x breaks it by hash seed).
            ("[a:b:5]]", 10, [(5, "a]"), (10, "b]")]),
            ("[a:b:5]]]", 10, [(10, "[a:b:5]]]")]),
            ("[a:b:5]]]]", 10, [(5, "a]]]"), (10, "b]]]")]),
            ("[a:b:5])", 10, [(5, "a)"), (10, "b)")]),
            ("[a:b:5]):", 10, [(10, "[a:b:5]):")]),
            ("[a|b]]", 2, [(1, "a]"), (2, "b]")]),
            ("[a|b]]]", 2, [(1, "a]]"), (2, "b]]")]),  # [a|b is not a valid prefix
            ("(d [e:f:3]))", 10, [(10, "(d [e:f:3]))")]),
            ("(d [e:f:3])))", 10, [(3, "(d e)))"), (10, "(d f)))")]),
            ("x [a:3]::", 10, [(10, "x [a:3]::")]),
            ("[[c]](d [e:f:3])(d [e:f:3]):(", 10, [(3, "[[c]](d e)(d e):("), (10, "[[c]](d f)(d f):(")]),
            (
                "[](d [e:f:3])[[c]]((1girlcat",
                10,
                [(3, "[](d e)[[c]]((1girlcat"), (10, "[](d f)[[c]]((1girlcat")],
            ),
            (
                "[a|b][a:b:5] [a:b:5]((sky))((sky))[((dog:1.2)[",
                2,
                [(1, "aa a((sky))((sky))[((dog:1.2)["), (2, "ba a((sky))((sky))[((dog:1.2)[")],
            ),
            (
                "()))((x)::[a:3]::[a:b:0.5](([a:3])):",
                10,
                [
                    (3, "()))((x)::[a:3]::a(()):"),
                    (5, "()))((x)::[a:3]::a((a)):"),
                    (10, "()))((x)::[a:3]::b((a)):"),
                ],
            ),
        ],
    )
    def test_ties_between_construct_and_strays_follow_lark(
        self, prompt: str, steps: int, expected: list[tuple[int, str]]
    ) -> None:
        assert _one(prompt, steps) == expected

    @pytest.mark.parametrize("repeat", [3, 60])  # replayed, and past the replay's length limit
    def test_long_ambiguous_prompt(self, repeat: int, monkeypatch: pytest.MonkeyPatch) -> None:
        prompt = "(masterpiece:1.2), [cat:dog:0.5], " * repeat + "[a:b:5]]]"
        tail = "[a:b:5]]]"
        replayed: list[str] = []

        def replay(text: str) -> list[tuple[str, int, int]] | None:
            replayed.append(text)
            return prompt_editing_grammar._replay(text)

        monkeypatch.setattr(prompt_editing, "_replay", replay)
        assert _one(prompt, 10) == [
            (5, "(masterpiece:1.2), cat, " * repeat + tail),
            (10, "(masterpiece:1.2), dog, " * repeat + tail),
        ]
        assert replayed == ([prompt] if len(prompt) <= prompt_editing_grammar._REPLAY_LIMIT else [])

    def test_the_replay_grows_at_most_quadratically(self) -> None:
        """The replay's work, counted in Earley items, at most quadruples when an ambiguous
        prompt doubles, up to the length limit past which it is not run."""
        items = []
        for repeat in (3, 6, 12, 24):
            prompt = "(masterpiece:1.2), [cat:dog:0.5], " * repeat + "[a:b:5]]]"
            assert len(prompt) <= prompt_editing_grammar._REPLAY_LIMIT
            replay = prompt_editing_grammar._Replay(prompt)
            assert replay.run()
            items.append(sum(len(column) for column in replay.columns))
        assert all(0 < a < b <= a * 4 for a, b in zip(items, items[1:], strict=False))

    def test_ambiguous_emphasis_around_editing(self) -> None:
        prompt = "(x [cat:dog:0.5]) " * 3 + "(y [a:b:5]))"
        assert _one(prompt, 10) == [
            (5, "(x cat) " * 3 + "(y [a:b:5]))"),
            (10, "(x dog) " * 3 + "(y [a:b:5]))"),
        ]

    @pytest.mark.parametrize(
        "prompt",
        [
            "[a:b:5:3]",  # two numbers
            "[a:b:1.5.]",  # the number token stops at '1.5'
            "[a:b:1e]",
            "[(a:b:c):3]",  # ( P : P ) allows one colon
            "[a:]",
            "((a:b:3)",
        ],
    )
    def test_invalid_constructs_are_plain_text(self, prompt: str) -> None:
        assert _one(prompt, 10) == [(10, prompt)]

    def test_mixed_bar_and_colon_is_rejected(self) -> None:
        # A1111's doctest expects otherwise; its parser really rejects this prompt.
        prompt = "a [{b|d{:.5] c"
        assert _one(prompt, 10) == [(10, prompt)]

    @pytest.mark.parametrize(
        "prompt",
        [
            "a|b [c:d:5]",  # a bar outside an alternation
            "[a:b:3] and [c|d]|",
            "([a|b)]",
            "[a|b",
            "[c:d:5] a\\",  # a lone trailing backslash matches no token
            "[c:d:5] \\\n",  # an escape cannot take a newline
        ],
    )
    def test_rejected_prompts_are_unchanged(self, prompt: str) -> None:
        assert _one(prompt, 10) == [(10, prompt)]
        assert _one(prompt, 20, hires_steps=8) == [(8, prompt)]

    def test_escapes_are_kept(self) -> None:
        assert _one("\\[a:b:5\\]", 10) == [(10, "\\[a:b:5\\]")]
        assert _one("a\\\\[b:c:3]", 10) == [(3, "a\\\\b"), (10, "a\\\\c")]
        assert _one("[a:\\|:3]", 10) == [(3, "a"), (10, "\\|")]
        assert _one("a\\\\", 10) == [(10, "a\\\\")]

    def test_hires_integer_and_fraction(self) -> None:
        assert _one("[a:b:25]", 20, hires_steps=10) == [(5, "a"), (10, "b")]
        assert _one("[a:b:1.5]", 20, hires_steps=10) == [(5, "a"), (10, "b")]
        assert _one("[a:b:10]", 20, hires_steps=10) == [(10, "b")]  # ended in the first pass
        assert _one("[a:b:0.5]", 20, hires_steps=10) == [(10, "b")]
        assert _one("[a|b]", 20, hires_steps=3) == [(1, "a"), (2, "b"), (3, "a")]

    def test_old_timelines(self) -> None:
        assert _one("[a:b:0.5]", 20, old_timelines=True) == [(10, "a"), (20, "b")]
        assert _one("[a:b:1.0]", 20, old_timelines=True) == [(1, "a"), (20, "b")]  # 1.0 is a step
        assert _one("[a:b:5]", 20, old_timelines=True) == [(5, "a"), (20, "b")]
        # Hires steps are ignored: the base steps are used.
        assert _one("[a:b:0.5]", 20, hires_steps=10, old_timelines=True) == [(10, "a"), (20, "b")]

    def test_many_prompts_in_order_with_duplicates(self) -> None:
        result = prompt_schedules(["[a:b:2]", "plain", "[a:b:2]"], 4)
        assert result == [[(2, "a"), (4, "b")], [(4, "plain")], [(2, "a"), (4, "b")]]

    def test_empty_prompt_and_empty_list(self) -> None:
        assert prompt_schedules([""], 5) == [[(5, "")]]
        assert prompt_schedules([], 5) == []

    def test_huge_numbers_do_not_raise(self) -> None:
        # A1111 crashes on int(inf); the natural limits are "all steps" and "never".
        assert _one("[a:b:1e999]", 10) == [(10, "a")]
        assert _one("[a:b:-1e999]", 10) == [(10, "b")]
        assert _one("[a:b:1.e999]", 10) == [(10, "a")]
        assert _one("[a:b:1e999]", 0) == [(0, "a")]

    def test_deep_nesting_does_not_recurse(self) -> None:
        depth = 5000
        nested = "[a:" * depth + "x" + ":1]" * depth
        assert _one(nested, 3) == [(1, "a"), (3, "x")]
        assert _one("(" * depth + "[a|b]" + ")" * depth, 2)[1] == (2, "(" * depth + "b" + ")" * depth)
        assert _one("[" * depth, 2) == [(2, "[" * depth)]

    @settings(max_examples=fuzz_examples(10_000), deadline=None)
    @given(
        _syntax_text, st.integers(min_value=0, max_value=40), st.none() | st.integers(1, 20), st.booleans()
    )
    def test_fuzz_never_raises(self, text: str, steps: int, hires: int | None, old: bool) -> None:
        (schedule,) = prompt_schedules([text], steps, hires_steps=hires, old_timelines=old)
        final = hires if hires is not None and not old else steps
        assert schedule[-1][0] == final
        assert [step for step, _ in schedule] == sorted({step for step, _ in schedule})


# ---------------------------------------------------------------------------------------
# scheduled_at


class TestScheduledAt:
    def test_parity_example(self) -> None:
        (schedule,) = prompt_schedules(["[a:b:10]"], 20)
        assert scheduled_at(schedule, 0) == "a"
        assert scheduled_at(schedule, 10) == "a"
        assert scheduled_at(schedule, 11) == "b"
        assert scheduled_at(schedule, 19) == "b"

    def test_past_the_end_uses_the_first_entry(self) -> None:
        (schedule,) = prompt_schedules(["[a:b:10]"], 20)
        assert scheduled_at(schedule, 21) == "a"

    def test_fraction_099_never_reaches_to(self) -> None:
        (schedule,) = prompt_schedules(["[a:b:0.99]"], 20)
        assert [scheduled_at(schedule, call) for call in range(20)] == ["a"] * 20

    def test_alternation_uses_first_option_twice(self) -> None:
        (schedule,) = prompt_schedules(["[a|b|c]"], 6)
        assert [scheduled_at(schedule, call) for call in range(6)] == ["a", "a", "b", "c", "a", "b"]

    def test_hires_call_counter_restarts(self) -> None:
        (schedule,) = prompt_schedules(["[a:b:25]"], 20, hires_steps=10)
        assert [scheduled_at(schedule, call) for call in range(10)] == ["a"] * 6 + ["b"] * 4

    def test_works_for_any_item_type(self) -> None:
        assert scheduled_at([(2, 1.5), (5, 2.5)], 3) == 2.5

    def test_empty_schedule_is_an_error(self) -> None:
        with pytest.raises(ValueError):
            scheduled_at([], 0)


# ---------------------------------------------------------------------------------------
# split_and


class TestSplitAnd:
    def test_parity_example(self) -> None:
        assert split_and("a AND b") == [("a", 1.0), (" b", 1.0)]

    @pytest.mark.parametrize(
        ("prompt", "expected"),
        [
            ("a", [("a", 1.0)]),
            ("", [("", 1.0)]),
            ("ANDROID and android", [("ANDROID and android", 1.0)]),
            ("a AND", [("a", 1.0), ("", 1.0)]),
            ("AND", [("", 1.0), ("", 1.0)]),
            ("a:1.5 AND b : -2. AND c:x", [("a", 1.5), (" b", -2.0), (" c:x", 1.0)]),
            ("a :+.5 ", [("a", 0.5)]),
            ("a:", [("a:", 1.0)]),
            ("a:1:2", [("a:1", 2.0)]),
            ("(b:1.2)", [("(b:1.2)", 1.0)]),
            ("a  \n", [("a", 1.0)]),
            ("a AND a", [("a", 1.0), (" a", 1.0)]),
            ("x_AND_y", [("x_AND_y", 1.0)]),
            ("a AND  b:3\nAND c", [("a", 1.0), ("  b", 3.0), (" c", 1.0)]),
        ],
    )
    def test_split_and_weights(self, prompt: str, expected: list[tuple[str, float]]) -> None:
        assert split_and(prompt) == expected

    def test_weights_are_floats(self) -> None:
        for _, weight in split_and("a:2 AND b AND c:-1"):
            assert type(weight) is float
