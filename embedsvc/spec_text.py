"""The text form of a pooling spec ('gem:p=4', 'spp:levels=1,2;combine=concat'), read by the pooling registry and
the Python client alike. A leaf module: it imports nothing of the project, so every layer may use it."""

from __future__ import annotations


class SpecTextError(ValueError):
    """A spec's text is not `name` or `name:key=value;key=value`: `part` of pooling `name` has no '='."""

    def __init__(self, name: str, part: str):
        super().__init__(f"{name}: parameter {part[:80]!r} must be written key=value")
        self.name, self.part = name, part


def parse_spec_text(text: str) -> tuple[str, dict[str, str]]:
    """(name, raw string parameters); ';' separates parameters, blanks around names and values are dropped."""
    name, _, rest = text.partition(":")
    params = {}
    for part in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = part.partition("=")
        if not eq:
            raise SpecTextError(name.strip(), part)
        params[key.strip()] = value.strip()
    return name.strip(), params
