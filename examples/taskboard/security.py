"""Passwords (pwdlib, argon2id) and the login JWT that both the REST API and tidings accept.

One token serves both doors: it is an HS256 JWT signed with the board's secret, which is also
tidings' ``token_hmac_secret``, and it carries the claims tidings reads from a connection token
(README "Tokens"): ``sub`` (the user), ``exp``, and ``info`` (shown to others in presence,
join/leave and chat messages). The REST API checks it with the very verifier tidings uses
(``tidings.tokens``), so the two can never disagree about a token.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import jwt
from pwdlib import PasswordHash

from tidings.auth import TokenVerifier
from tidings.errors import TokenExpired, Unauthorized

ALGORITHM = "HS256"

# argon2id with pwdlib's recommended parameters (RFC 9106's second recommended option)
_hasher = PasswordHash.recommended()


@functools.cache
def _nobody() -> str:
    """Checked against when the user does not exist, so that a wrong name costs as long as a
    wrong password and response times do not tell which names exist."""
    return _hasher.hash("no such user")


async def hash_password(password: str) -> str:
    """An argon2id hash string. Runs in a thread: hashing takes tens of ms of CPU by design."""
    return await asyncio.to_thread(_hasher.hash, password)


async def check_password(password: str, stored: str | None) -> tuple[bool, str | None]:
    """(matches, a new hash to store or None). ``stored`` None: the user does not exist (always
    False, after as much work as a real check). A new hash is returned when the stored one
    was made with weaker parameters than pwdlib's current ones."""
    ok, updated = await asyncio.to_thread(
        _hasher.verify_and_update, password, stored if stored is not None else _nobody()
    )
    return ok and stored is not None, updated


class TokenError(Exception):
    """A bearer token that cannot be accepted; ``str()`` says why (never the token)."""


class Tokens:
    """Issues login JWTs and reads them back.

    ``secret``: the HS256 key (tidings verifies with the same); ``ttl``: seconds a token lives;
    ``verifier``: tidings' verifier (``tidings.tokens``)."""

    def __init__(self, secret: str, ttl: int, verifier: TokenVerifier) -> None:
        self._secret = secret
        self.ttl = ttl
        self._verifier = verifier

    def issue(self, user: str) -> str:
        issued = int(time.time())
        claims: dict[str, Any] = {
            "sub": user,
            "iat": issued,
            "exp": issued + self.ttl,
            "info": {"name": user},
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def user(self, token: str) -> str:
        """The user a token was issued to; TokenError if it is invalid or expired."""
        try:
            claims = self._verifier.claims(token)
        except TokenExpired:
            raise TokenError("token expired") from None
        except Unauthorized as exc:
            raise TokenError(exc.message) from None
        return str(claims["sub"])
