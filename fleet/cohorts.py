"""Cohorts: label selectors evaluated live against the device registry.

A selector is a comma-separated list of terms, all of which must hold:

- ``key=value``          the label equals value
- ``key=v1|v2``          the label is one of the values
- ``key!=value``         the label is absent or differs
- ``key``                the label is present
- ``!key``               the label is absent
- ``*`` (alone)          every device

``hw=rpi5,region=eu`` is every Raspberry Pi 5 in the EU. Keys and values are
1-63 characters of letters, digits, ``.``, ``_``, ``-`` and ``/``. The fleet
adds labels derived from each device's hardware fingerprint (``cpu.arch``,
``cpu.class``, ``cpu.vnni``, ``cpu.avx512``, ``cpu.dotprod``, ``cpu.i8mm``;
``wire.hardware_labels``), so ``cpu.class=x86-avx2,cpu.vnni=false`` selects
like any other term.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_TOKEN = r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}"
#: A label key or value (use ``fullmatch``).
LABEL_TOKEN = re.compile(_TOKEN)
_TERM = re.compile(
    rf"^(?:(?P<neg>!)(?P<absent>{_TOKEN})|(?P<key>{_TOKEN})"
    rf"(?:(?P<op>!=|=)(?P<values>{_TOKEN}(?:\|{_TOKEN})*))?)$"
)


class SelectorError(ValueError):
    """A selector that does not parse; the message points at the bad term."""


@dataclass(frozen=True)
class Term:
    key: str
    op: str  # "=", "!=", "exists", "absent"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "absent":
            return value is None
        if self.op == "=":
            return value in self.values
        return value not in self.values  # "!="

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "absent":
            return f"!{self.key}"
        return f"{self.key}{self.op}{'|'.join(self.values)}"


@dataclass(frozen=True)
class Selector:
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        source = text.strip()
        if source == "*":
            return cls(())
        if not source:
            raise SelectorError("empty selector (use '*' for every device)")
        terms = []
        for i, raw in enumerate(source.split(",")):
            part = raw.strip()
            m = _TERM.match(part)
            if m is None:
                raise SelectorError(
                    f"selector {text!r}: term {i + 1} {part!r} is not key, !key, key=value, "
                    "key=v1|v2 or key!=value (letters, digits, . _ - /)"
                )
            if m["absent"]:
                terms.append(Term(m["absent"], "absent"))
            elif m["op"]:
                terms.append(Term(m["key"], m["op"], tuple(m["values"].split("|"))))
            else:
                terms.append(Term(m["key"], "exists"))
        return cls(tuple(terms))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)

    def select(self, devices: Iterable[Mapping[str, object]]) -> list[str]:
        """Ids of the devices (registry rows with ``device_id`` and ``labels``) that match."""
        out = []
        for d in devices:
            labels = d.get("labels") or {}
            if isinstance(labels, Mapping) and self.matches(labels):
                out.append(str(d["device_id"]))
        return out

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms) or "*"


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    """``["hw=rpi5", "region=eu"]`` to a dict, with the same character rules as selectors."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not LABEL_TOKEN.fullmatch(key) or not LABEL_TOKEN.fullmatch(value):
            raise SelectorError(f"label {item!r} must be key=value (letters, digits, . _ - /)")
        out[key] = value
    return out
