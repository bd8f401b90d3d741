"""The one filter grammar (`embedsvc search --filter`, the search page, HTTP/gRPC `filter_text`): a table of texts
and the conditions they mean, texts that must be refused with the accepted forms named, and every accepted form
evaluated by both back ends' condition code against a plain Python reading of the same metadata."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from embedsvc.errors import InvalidInput
from embedsvc.store import Condition, Filter
from embedsvc.store.filter_text import FORMS, parse_filter_text

CASES = [
    ("label=7", [Condition("label", equals=7)]),
    ('label="7"', [Condition("label", equals="7")]),
    ("done=true", [Condition("done", equals=True)]),
    ("colour=red", [Condition("colour", equals="red")]),
    ("ratio=0.5", [Condition("ratio", equals=0.5)]),
    ("n=-3e2", [Condition("n", equals=-300.0)]),
    ("colour=red|blue|3", [Condition("colour", any_of=("red", "blue", 3))]),
    ('tag="a|b"', [Condition("tag", equals="a|b")]),
    ('tag="7"|word2', [Condition("tag", any_of=("7", "word2"))]),
    ('caption="a blue star"', [Condition("caption", equals="a blue star")]),
    ('q="say \\"hi\\" \\\\ bye"', [Condition("q", equals='say "hi" \\ bye')]),
    ('"my key"=1', [Condition("my key", equals=1)]),
    ('s=""', [Condition("s", equals="")]),
    ("sort_order>=1000", [Condition("sort_order", gte=1000)]),
    ("sort_order>1000", [Condition("sort_order", gt=1000)]),
    ("n<=2.5", [Condition("n", lte=2.5)]),
    ("n<-1", [Condition("n", lt=-1)]),
    (
        '  objects>=2   colours="blue red"  shapes=circle|square ',
        [
            Condition("objects", gte=2),
            Condition("colours", equals="blue red"),
            Condition("shapes", any_of=("circle", "square")),
        ],
    ),
    ("n>2 n<=5", [Condition("n", gt=2), Condition("n", lte=5)]),
    ("nan=inf", [Condition("nan", equals="inf")]),  # words that float() would take are strings
    ("x=1_000", [Condition("x", equals="1_000")]),
    ("v=hello!", [Condition("v", equals="hello!")]),
    ("", []),
    ("   ", []),
]


@pytest.mark.parametrize("text, conditions", CASES, ids=[c[0] or "empty" for c in CASES])
def test_texts_mean_these_conditions(text, conditions):
    parsed = parse_filter_text(text)
    assert (list(parsed.must) if parsed is not None else []) == conditions


def test_numbers_keep_the_type_they_are_written_in():
    """7 stays an int and 7.0 a float (messages show them as written); both match the stored number 7."""
    (seven,), (decimal,) = parse_filter_text("n=7").must, parse_filter_text("n=7.0").must
    assert type(seven.equals) is int and type(decimal.equals) is float
    assert seven.matches({"n": 7.0}) and decimal.matches({"n": 7})


BAD = [
    ("sort_order=>1000", "'=>'"),
    ("label==7", "'=='"),
    ("label=", "empty value"),
    ("label= other=1", "empty value"),
    ("label=a|", "empty value"),
    ("label=|a", "empty value"),
    ("label!=7", "!= (not equal) is not supported"),
    ("label", "no operator"),
    ("=7", "no key"),
    (">=7", "no key"),
    ("n>=abc", "a number"),
    ('n>="5"', "a number"),
    ("n>=true", "a number"),
    ("n>=nan", "a number"),
    ("n>=5|6", "a number"),
    ('caption="a blue star', "unterminated"),
    ('a=1"b"', "space between clauses"),
    ("a=b=c", "'='"),
    ("objects >= 2", "no operator"),
    ("a<b>c", "a number"),
]


@pytest.mark.parametrize("text, problem", BAD, ids=[b[0] for b in BAD])
def test_text_that_does_not_parse_names_the_problem_and_the_accepted_forms(text, problem):
    with pytest.raises(InvalidInput) as caught:
        parse_filter_text(text)
    message = str(caught.value)
    assert problem in message and FORMS in message and "\n" not in message, message
    for form in ("KEY=VALUE", "KEY=A|B", "KEY>=X", "KEY>X", "KEY<=X", "KEY<X"):
        assert form in message


METADATA = [{"n": n, "even": n % 2 == 0, "name": f"n{n}", "half": n / 2} for n in range(-3, 9)]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("n>=2", lambda m: m["n"] >= 2),
        ("n>2", lambda m: m["n"] > 2),
        ("n<=2", lambda m: m["n"] <= 2),
        ("n<2", lambda m: m["n"] < 2),
        ("n>-2 n<5", lambda m: -2 < m["n"] < 5),
        ("half>1.5", lambda m: m["half"] > 1.5),
        ("half<1.5 half>=0.5", lambda m: 0.5 <= m["half"] < 1.5),
        ("even=true n>=0", lambda m: m["even"] and m["n"] >= 0),
        ("name=n3|n5|n99", lambda m: m["name"] in ("n3", "n5", "n99")),
        ("n=3|5", lambda m: m["n"] in (3, 5)),
        ("even>=0", lambda m: False),  # ranges compare numbers: booleans never match
    ],
)
def test_conditions_select_what_plain_python_selects(text, expected):
    """Condition.matches (the reference both back ends are tested against) and the local metadata index."""
    from embedsvc.store.metadata import MetadataIndex

    flt = parse_filter_text(text)
    index = MetadataIndex()
    for label, metadata in enumerate(METADATA):
        index.add(label, metadata)
    want = {label for label, m in enumerate(METADATA) if expected(m)}
    assert {label for label, m in enumerate(METADATA) if flt.matches(m)} == want
    if text != "even>=0":
        assert set(index.labels(flt).tolist()) == want


def test_a_range_bound_is_exclusive_or_inclusive_only_as_written():
    above, below, at_least = (Filter((Condition("n", **b),)) for b in ({"gt": 2}, {"lt": 2}, {"gte": 2}))
    assert above.matches({"n": 2.0000001}) and not above.matches({"n": 2})
    assert below.matches({"n": 1.9999}) and not below.matches({"n": 2})
    assert at_least.matches({"n": 2}) and not at_least.matches({"n": 1.9999})


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('ab7 .-+e"\\|=<>!_\t')) | st.characters(), max_size=40))
def test_any_text_parses_or_is_refused_with_the_forms(text):
    """No text crashes the parser or reaches the store as something else: a Filter, None, or InvalidInput."""
    try:
        parsed = parse_filter_text(text)
    except InvalidInput as exc:
        assert FORMS in str(exc)
        return
    assert parsed is None or all(c.key for c in parsed.must)


@pytest.mark.parametrize(
    "text, conditions",
    [
        ("k=٣", [Condition("k", equals="٣")]),  # an Arabic-Indic digit is a word, not the number 3
        ("k=𝟙|١٢", [Condition("k", any_of=("𝟙", "١٢"))]),
        ("k=１", [Condition("k", equals="１")]),  # a full-width digit
    ],
)
def test_only_ascii_digits_make_a_number(text, conditions):
    """float() reads any Unicode decimal digit; the grammar's numbers are ASCII, so `k=٣` matches the stored
    string "٣" and never the number 3."""
    assert list(parse_filter_text(text).must) == conditions
    with pytest.raises(InvalidInput, match="a number"):
        parse_filter_text(text.replace("=", ">", 1).split("|")[0])


@pytest.mark.parametrize("text", ["k=1e309", "k=-1e400", "k=" + "9" * 400, "k=red|1e309", "k>1e309", "k<=-1e400"])
def test_a_number_no_double_holds_is_refused_not_read_as_a_string(text):
    """`k=1e309` is written as a number; silently meaning the string "1e309" would miss every stored number
    (or be refused with the hint to leave it unquoted, which it was)."""
    with pytest.raises(InvalidInput) as caught:
        parse_filter_text(text)
    message = str(caught.value)
    assert "beyond" in message and "quote it" in message and FORMS in message, message
    assert list(parse_filter_text('k="1e309"').must) == [Condition("k", equals="1e309")]


def test_a_filter_has_at_most_max_conditions_and_values():
    """A filter's cost grows with its conditions (each scans its key's distinct values; on Milvus each is
    queried), so a 64 MiB text of clauses would hold a search, and the writers behind its lock, for hours."""
    from embedsvc.store.filter_text import MAX_FILTER_TEXT_CHARS
    from embedsvc.store.metadata import MAX_CONDITIONS, MAX_FILTER_VALUES

    assert len(parse_filter_text(" ".join(f"k{i}={i}" for i in range(MAX_CONDITIONS))).must) == MAX_CONDITIONS
    with pytest.raises(InvalidInput, match=f"{MAX_CONDITIONS + 1} conditions; at most {MAX_CONDITIONS} are allowed"):
        parse_filter_text(" ".join(f"k{i}={i}" for i in range(MAX_CONDITIONS + 1)))
    with pytest.raises(InvalidInput, match=f"at most {MAX_CONDITIONS}"):
        Filter(tuple(Condition("k", gte=i) for i in range(MAX_CONDITIONS + 1)))
    values = "|".join(str(i) for i in range(MAX_FILTER_VALUES))
    assert len(parse_filter_text(f"k={values}").must[0].any_of) == MAX_FILTER_VALUES
    with pytest.raises(InvalidInput, match=f"at most {MAX_FILTER_VALUES} are allowed"):
        parse_filter_text(f"k={values}|x")
    with pytest.raises(InvalidInput, match=f"at most {MAX_FILTER_VALUES}"):
        Filter((Condition("k", any_of=tuple(range(MAX_FILTER_VALUES))), Condition("j", any_of=("x",))))
    with pytest.raises(InvalidInput, match=f"over {MAX_FILTER_TEXT_CHARS} characters"):
        parse_filter_text('k="' + "a" * MAX_FILTER_TEXT_CHARS + '"')
