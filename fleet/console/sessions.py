"""Browser sessions of the console: an operator logs in once with a token, the browser
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
