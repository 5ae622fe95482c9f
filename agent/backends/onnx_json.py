"""A byte-level JSON prefix checker, used to keep ONNX generations syntactically JSON.

ONNX Runtime has no grammar engine, so for a JSON-schema request the ONNX
backend filters candidate tokens: it walks the model's candidates from the
most likely down and takes the first whose bytes keep the output a prefix of
some valid JSON text (``JsonPrefix.accepts``). The schema itself is not
compiled: only its root type is enforced here, and the finished value is
validated against the whole schema afterwards (validate-and-retry).

The checker is a small pushdown automaton over bytes (RFC 8259): objects,
arrays, strings with escapes, numbers, ``true``/``false``/``null``. Bytes of
0x80 and above are accepted inside strings; ``json.loads`` checks the UTF-8
at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
_LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
_ROOT_FIRST = {"object": b"{", "array": b"[", "string": b'"', "boolean": b"tf", "null": b"n",
               "number": b"-0123456789", "integer": b"-0123456789"}

# modes
VALUE = 0  # a value must start (whitespace allowed)
AFTER = 1  # a value ended inside a container: ',' or the closer
KEY_OR_END = 2  # just after '{'
KEY = 3  # after ',' in an object
COLON = 4
STRING = 5
ESCAPE = 6
UNICODE = 7  # inside \\uXXXX
LITERAL = 8
DONE = 9  # the root value is complete
# numbers: after '-', after a leading 0, in integer digits, after '.', in fraction
# digits, after 'e', after the exponent sign, in exponent digits
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(10, 18)
_NUMBER_END = frozenset({N_ZERO, N_INT, N_FRAC, N_EXP})


@dataclass
class JsonPrefix:
    """The state after some bytes; ``copy()`` it to try a continuation."""

    root_first: bytes = b""  # allowed first bytes of the root value (b"" = any)
    stack: list[int] = field(default_factory=list)  # ord("{") or ord("[")
    mode: int = VALUE
    key: bool = False  # the string being read is an object key
    pending: bytes = b""  # the rest of a literal, or hex digits left in \\u
    started: bool = False

    @classmethod
    def for_schema(cls, schema: dict[str, object]) -> JsonPrefix:
        kind = schema.get("type")
        return cls(root_first=_ROOT_FIRST.get(kind, b"") if isinstance(kind, str) else b"")

    def copy(self) -> JsonPrefix:
        return JsonPrefix(self.root_first, list(self.stack), self.mode, self.key, self.pending,
                          self.started)

    @property
    def complete(self) -> bool:
        """The root value is finished (a number only counts when the text ends here)."""
        return self.mode == DONE or (not self.stack and self.mode in _NUMBER_END)

    def accepts(self, data: bytes) -> bool:
        """Feed ``data``; False (state then undefined) if no valid JSON starts like this."""
        return all(self._byte(b) for b in data)

    def _end_value(self) -> None:
        self.mode = AFTER if self.stack else DONE

    def _start_value(self, b: int) -> bool:
        if not self.started:
            if self.root_first and b not in self.root_first:
                return False
            self.started = True
        if b == ord("{"):
            self.stack.append(b)
            self.mode = KEY_OR_END
        elif b == ord("["):
            self.stack.append(b)
            self.mode = VALUE
            self.pending = b"]"  # marks "an empty array may close here"
        elif b == ord('"'):
            self.mode, self.key = STRING, False
        elif b in _LITERALS:
            self.mode, self.pending = LITERAL, _LITERALS[b]
        elif b == ord("-"):
            self.mode = N_MINUS
        elif b == ord("0"):
            self.mode = N_ZERO
        elif b in _DIGITS:
            self.mode = N_INT
        else:
            return False
        return True

    def _number(self, b: int) -> bool | None:
        """Advance a number; None when ``b`` ends it (to be read as what follows)."""
        m = self.mode
        if m == N_MINUS:
            if b == ord("0"):
                self.mode = N_ZERO
            elif b in _DIGITS:
                self.mode = N_INT
            else:
                return False
            return True
        if m in (N_ZERO, N_INT):
            if m == N_INT and b in _DIGITS:
                return True
            if b == ord("."):
                self.mode = N_DOT
                return True
            if b in b"eE":
                self.mode = N_E
                return True
            return None
        if m in (N_DOT, N_FRAC):
            if b in _DIGITS:
                self.mode = N_FRAC
                return True
            if m == N_FRAC and b in b"eE":
                self.mode = N_E
                return True
            return False if m == N_DOT else None
        if m in (N_E, N_ESIGN):
            if b in _DIGITS:
                self.mode = N_EXP
                return True
            if m == N_E and b in b"+-":
                self.mode = N_ESIGN
                return True
            return False
        # N_EXP
        return True if b in _DIGITS else None

    def _byte(self, b: int) -> bool:
        m = self.mode
        if m >= N_MINUS:
            step = self._number(b)
            if step is not None:
                return step
            self._end_value()  # the number ended; read b in the new mode
            m = self.mode
        if m == STRING:
            if b == ord('"'):
                if self.key:
                    self.mode = COLON
                else:
                    self._end_value()
            elif b == ord("\\"):
                self.mode = ESCAPE
            elif b < 0x20:
                return False
            return True
        if m == ESCAPE:
            if b not in _ESCAPES:
                return False
            if b == ord("u"):
                self.mode, self.pending = UNICODE, b"xxxx"
            else:
                self.mode = STRING
            return True
        if m == UNICODE:
            if b not in _HEX:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self.mode = STRING
            return True
        if m == LITERAL:
            if not self.pending or b != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self._end_value()
            return True
        if b in _WS:  # between tokens, and after the root value
            return True
        if m == VALUE:
            if b == ord("]") and self.pending == b"]":  # "[]": the array closes empty
                self.pending = b""
                self.stack.pop()
                self._end_value()
                return True
            self.pending = b""
            return self._start_value(b)
        if m == KEY_OR_END:
            if b == ord("}"):
                self.stack.pop()
                self._end_value()
                return True
            if b == ord('"'):
                self.mode, self.key = STRING, True
                return True
            return False
        if m == KEY:
            if b == ord('"'):
                self.mode, self.key = STRING, True
                return True
            return False
        if m == COLON:
            if b == ord(":"):
                self.mode = VALUE
                return True
            return False
        if m == AFTER:
            top = self.stack[-1]
            if b == ord(","):
                self.mode = KEY if top == ord("{") else VALUE
                return True
            if (top == ord("{") and b == ord("}")) or (top == ord("[") and b == ord("]")):
                self.stack.pop()
                self._end_value()
                return True
            return False
        return False  # DONE: nothing but whitespace may follow
