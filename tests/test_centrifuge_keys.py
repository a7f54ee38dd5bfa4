"""Asymmetric client JWTs: PEM public keys per algorithm family, and a JWKS URL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .cfutil import Raw
from .conftest import Serve

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def signed(key: PrivateKey, alg: str, sub: str = "alice", **headers: Any) -> str:
    claims = {"sub": sub, "exp": int(time.time()) + 600}
    return jwt.encode(claims, key, algorithm=alg, headers=headers or None)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwks_url(rsa_key: rsa.RSAPrivateKey) -> Iterator[str]:
    """A JWKS document served on loopback, holding the RSA public key as kid "k1"."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    server.shutdown()
    server.server_close()


async def connects(url: str, tok: str) -> bool:
    c = await Raw.open(url)
    await c.send({"connect": {"token": tok}})
    try:
        frame = await c.read_frame()
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None and exc.rcvd.code == 3500
        return False
    assert "connect" in frame[0], frame
    await c.close()
    return True


async def test_pem_keys_per_algorithm_family(serve: Serve, rsa_key: rsa.RSAPrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    srv = await serve(
        token_rsa_public_key=public_pem(rsa_key),
        token_ecdsa_public_key=public_pem(ec_key),
        token_public_key=public_pem(ed_key),
    )
    assert await connects(srv.ws, signed(rsa_key, "RS256"))
    assert await connects(srv.ws, signed(rsa_key, "PS384"))
    assert await connects(srv.ws, signed(ec_key, "ES256"))
    assert await connects(srv.ws, signed(ed_key, "EdDSA"))
    other = ec.generate_private_key(ec.SECP256R1())
    assert not await connects(srv.ws, signed(other, "ES256"))
    assert not await connects(srv.ws, jwt.encode({"sub": "a"}, "x" * 32, algorithm="HS256"))


async def test_jwks_url(serve: Serve, rsa_key: rsa.RSAPrivateKey, jwks_url: str) -> None:
    srv = await serve(token_jwks_url=jwks_url)
    assert await connects(srv.ws, signed(rsa_key, "RS256", kid="k1"))
    assert not await connects(srv.ws, signed(rsa_key, "RS256", kid="unknown"))
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert not await connects(srv.ws, signed(stranger, "RS256", kid="k1"))
