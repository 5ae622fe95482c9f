"""Browser sessions of the console: an operator logs in once with a token (or a name and
password of ``[console] users``, kept as scrypt hashes), the browser
keeps a session cookie, and every write carries the session's CSRF token.

The cookie holds a random session id (``HttpOnly``, ``SameSite=Strict``, ``Secure``
over HTTPS); the server keeps only its sha256, the operator it stands for and the
session's CSRF token, in memory: a fleet restart logs everyone out. A write made
with a session must send the CSRF token (header ``X-CSRF-Token`` or form field
``csrf``), compared in constant time — a page of another site can make the browser
send the cookie, but cannot read the token. Scripts use ``Authorization: Bearer``
and need no CSRF token (a browser never adds that header by itself).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..auth import Principal

COOKIE = "qf_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    expires: float


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._by_key: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, principal: Principal) -> tuple[str, Session]:
        """A new session: its id (for the cookie, never stored) and the session."""
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(24), self.clock() + self.ttl_s)
        with self._lock:
            now = self.clock()
            self._by_key = {k: s for k, s in self._by_key.items() if s.expires > now}
            self._by_key[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        with self._lock:
            session = self._by_key.get(_key(session_id))
        if session is None or session.expires <= self.clock():
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._by_key.pop(_key(session_id), None)


def csrf_ok(session: Session, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(session.csrf.encode(),
                                                         presented.encode())


# scrypt's cost: 16 MiB and about 50 ms per check on a 2-core host — slow for a guesser,
# once per login for an operator (sessions carry it afterwards).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def hash_password(password: str, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (urlsafe base64), what ``[console] users`` holds."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                            p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


_DUMMY = hash_password("not a password", b"0" * 16)


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether ``password`` matches ``encoded``; with None (no such user) a hash is
    still computed, so that the answer takes as long for a name that does not exist."""
    _, n, r, p, salt, digest = (encoded or _DUMMY).split("$")
    got = hashlib.scrypt(password.encode(), salt=base64.urlsafe_b64decode(salt), n=int(n),
                         r=int(r), p=int(p), dklen=len(base64.urlsafe_b64decode(digest)),
                         maxmem=256 * 1024 * 1024)
    return encoded is not None and hmac.compare_digest(got, base64.urlsafe_b64decode(digest))
