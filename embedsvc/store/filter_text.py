"""The one metadata filter grammar: `embedsvc search --filter`, the search page's filter box, and the HTTP/gRPC
search field `filter_text` all send the text to the server, which parses it here (one parser, no copies).

A filter text is clauses separated by spaces; an item matches when every clause holds:

  KEY=7        the number 7 (equals 7.0)        KEY="7"    the string "7"
  KEY=true     the boolean true                  KEY=red    the string "red" (not a number or boolean)
  KEY=a|b|3    any of the values, each typed by the same rules ("a|b" quoted is one string)
  KEY>=X  KEY>X  KEY<=X  KEY<X    a numeric range (X a number); `n>2 n<=5` bounds n on both sides

A key or value holding spaces, quotes or | = < > is written in double quotes, with \\" and \\\\ inside:
caption="a blue star". Text that does not parse is InvalidInput naming the clause and the accepted forms,
never a filter that silently matches nothing (`sort_order=>1000`, `label=`, `label!=3`).
"""

from __future__ import annotations

import math
import re

from embedsvc.errors import InvalidInput, quoted
from embedsvc.store.metadata import MAX_FILTER_VALUES, Condition, Filter, Value

FORMS = (
    "KEY=VALUE, KEY=A|B (any of), KEY>=X, KEY>X, KEY<=X or KEY<X (X a number); clauses separated by spaces "
    'must all hold; VALUE 7 is a number, true/false a boolean, other words strings, "7" or "a b" quoted strings'
)
_OPERATORS = (">=", "<=", "=", ">", "<")  # longest first
_OPERATOR_CHARS = "=<>"
_NOT_IN_VALUE = set(_OPERATOR_CHARS + '"|')
_NOT_IN_KEY = _NOT_IN_VALUE | {"!"}
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # ASCII: float() also reads "٣"
_RANGES = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt"}
# Keys are at most 128 bytes and values 4096, and a filter at most MAX_CONDITIONS conditions of MAX_FILTER_VALUES
# values in all: a longer text is refused before it is scanned (the scan runs on the server's event loop).
MAX_FILTER_TEXT_CHARS = 256 * 1024


def parse_filter_text(text: str) -> Filter | None:
    """The filter a text means (None for blank text), or InvalidInput naming the problem and the accepted forms."""
    if len(text) > MAX_FILTER_TEXT_CHARS:
        raise InvalidInput(
            f"filter {quoted(text.strip())} is over {MAX_FILTER_TEXT_CHARS} characters; send fewer or shorter clauses"
        )
    scanner = _Scanner(text)
    conditions = []
    while scanner.skip_spaces():
        conditions.append(scanner.clause())
    return Filter(tuple(conditions)) if conditions else None


def typed_word(word: str) -> Value:
    """An unquoted value: true/false a boolean, an ASCII decimal number a number (an int when written as one),
    else a string ("nan", "inf", "1_000" and "٣" stay words). The scanner refuses numerals beyond a double
    (1e309) before this: they are written as numbers, so reading them as strings would be silently wrong."""
    if word in ("true", "false"):
        return word == "true"
    if not _NUMBER.fullmatch(word):
        return word
    return int(word) if re.fullmatch(r"[+-]?[0-9]+", word) else float(word)


class _Scanner:
    """A cursor over the text; every error names the clause it is in."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.start = 0  # where the current clause began

    def fail(self, problem: str) -> InvalidInput:
        clause = re.split(r"\s", self.text[self.start :], maxsplit=1)[0]  # up to the next space: enough to find it
        where = f" in {quoted(clause)}" if clause and clause != self.text.strip() else ""
        return InvalidInput(f"filter {quoted(self.text.strip())}: {problem}{where}; write {FORMS}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> bool:
        """Moves past whitespace; False at the end of the text."""
        while self.peek().isspace():
            self.pos += 1
        self.start = self.pos
        return self.pos < len(self.text)

    def clause(self) -> Condition:
        key = self.word(_NOT_IN_KEY)
        if not key:
            raise self.fail(
                "no key before the operator"
                if key is None and self.peek() in _OPERATOR_CHARS
                else "an empty key"
                if key is not None
                else f"unexpected {self.peek()!r} where a key begins"
            )
        op = self.operator()
        if op == "=":
            values = [self.value()]
            while self.peek() == "|":
                self.pos += 1
                values.append(self.value())
                if len(values) > MAX_FILTER_VALUES:
                    raise self.fail(
                        f"more than {MAX_FILTER_VALUES} values; at most {MAX_FILTER_VALUES} are allowed in all"
                    )
            condition = Condition(key, equals=values[0]) if len(values) == 1 else Condition(key, any_of=tuple(values))
        else:
            condition = Condition(key, **{_RANGES[op]: self.bound()})  # type: ignore[arg-type]  # a bound: a float
        if self.peek() and not self.peek().isspace():
            raise self.fail(
                f"unexpected {self.peek()!r} after {quoted(self.text[self.start : self.pos])}: put a space "
                f'between clauses, or quote a value that holds " | = < >'
            )
        return condition

    def operator(self) -> str:
        if self.text.startswith("!=", self.pos):
            raise self.fail("!= (not equal) is not supported")
        op = next((o for o in _OPERATORS if self.text.startswith(o, self.pos)), None)
        if op is None:
            raise self.fail(
                "no operator after the key"
                if not self.peek() or self.peek().isspace()
                else f"unexpected {self.peek()!r} after the key"
            )
        self.pos += len(op)
        if self.peek() and self.peek() in _OPERATOR_CHARS:
            raise self.fail(f"{op + self.peek()!r} is not an operator")
        return op

    def value(self) -> Value:
        is_quoted = self.peek() == '"'
        word = self.word(_NOT_IN_VALUE)
        if word is None:
            raise self.fail('empty value (write KEY="" for the empty string)')
        return word if is_quoted else typed_word(self.finite(word))

    def bound(self) -> float:
        is_quoted = self.peek() == '"'
        word = self.word(_NOT_IN_VALUE)
        if word is None or is_quoted or not _NUMBER.fullmatch(word):
            raise self.fail(
                f"a range bound must be a number, not {quoted(word)}"
                if word is not None
                else "a range bound must be a number"
            )
        if self.peek() == "|":
            raise self.fail("a range bound must be a number, not a list (any-of is KEY=A|B)")
        number = typed_word(self.finite(word))
        assert not isinstance(number, str)  # _NUMBER matched: typed_word read a number
        return number

    def finite(self, word: str) -> str:
        """The word, unless it is a numeral no double holds (1e309, 400 nines): refused, never read as a string."""
        if _NUMBER.fullmatch(word) and not math.isfinite(float(word)):
            raise self.fail(
                f"{quoted(word)} is beyond the range of a number (about 1.8e308); to mean the string, quote it"
            )
        return word

    def word(self, stop: set) -> str | None:
        """A quoted string (escapes \\" and \\\\), or a run of characters up to whitespace or one of `stop`;
        None when there is none here."""
        if self.peek() == '"':
            return self.quoted_string()
        begin = self.pos
        while self.peek() and not self.peek().isspace() and self.peek() not in stop:
            self.pos += 1
        return self.text[begin : self.pos] or None

    def quoted_string(self) -> str:
        self.pos += 1
        out: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise self.fail('unterminated quote: close it with "')
            self.pos += 1
            if char == '"':
                return "".join(out)
            if char == "\\" and self.peek() in ('"', "\\"):
                char = self.peek()
                self.pos += 1
            out.append(char)
