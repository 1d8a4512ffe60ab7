"""auth.Verifier: every class of bad token of docs/protocol.md ("Identity") gets its reason,
good tokens give their identity; the algorithms follow from the key (PyJWT, cryptography).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from kasagi_relay.auth import (
    MAX_INFO_BYTES,
    MAX_TOKEN_BYTES,
    AuthError,
    Verifier,
    parse_jwks,
)
from kasagi_relay.config import Config, ConfigError

SECRET = "s" * 64
NOW = 1_800_000_000.0


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 3600, "rooms": {"lobby": "rw"}}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256", **kw: Any) -> str:
    return jwt.encode(payload, secret, algorithm=alg, **kw)


def reason(verifier: Verifier, token: str) -> str:
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=NOW)
    assert SECRET not in info.value.message
    assert len(token) < 8 or token not in info.value.message
    return info.value.reason


@pytest.fixture
def hmac() -> Verifier:
    return Verifier(secret=SECRET.encode(), leeway_s=5)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_a_good_token_gives_its_identity(hmac: Verifier) -> None:
    token = hs(claims(info={"name": "Alice"}, nbf=NOW - 10, iat=NOW - 10))
    who = hmac.verify(token, now=NOW)
    assert who.sub == "alice"
    assert who.exp == NOW + 3600
    assert who.info == {"name": "Alice"}
    assert who.can("r", "lobby") and who.can("w", "lobby")
    assert not who.can("r", "other")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_every_hmac_algorithm_with_a_secret(hmac: Verifier, alg: str) -> None:
    assert hmac.verify(hs(claims(), alg=alg), now=NOW).sub == "alice"


def test_patterns_and_rights_add_up(hmac: Verifier) -> None:
    token = hs(claims(rooms={"match-42.*": "r", "match-42.chat": "w", "*": "r"}))
    who = hmac.verify(token, now=NOW)
    assert who.can("r", "anything")
    assert who.can("w", "match-42.chat") and who.can("r", "match-42.chat")
    assert not who.can("w", "match-42.board")


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("", "malformed"),
        ("garbage", "malformed"),
        ("a.b.c", "malformed"),
        ("x" * (MAX_TOKEN_BYTES + 1), "malformed"),
    ],
)
def test_garbage(hmac: Verifier, token: str, expected: str) -> None:
    assert reason(hmac, token) == expected


def _unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(payload)}."


def test_alg_none_is_refused(hmac: Verifier) -> None:
    assert reason(hmac, _unsigned(claims())) == "algorithm"
    assert reason(hmac, _unsigned(claims(), alg="None")) == "algorithm"


def test_wrong_secret(hmac: Verifier) -> None:
    assert reason(hmac, hs(claims(), secret="t" * 64)) == "signature"


def test_a_tampered_payload(hmac: Verifier) -> None:
    head, _, sig = hs(claims()).split(".")
    body = base64.urlsafe_b64encode(json.dumps(claims(sub="mallory")).encode()).rstrip(b"=")
    assert reason(hmac, f"{head}.{body.decode()}.{sig}") == "signature"


def test_algorithm_confusion_hmac_with_the_public_pem(rsa_key: rsa.RSAPrivateKey) -> None:
    public = rsa_key.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    verifier = Verifier(public_key=public)
    # PyJWT itself refuses to sign with a PEM as an HMAC secret: build the token by hand.
    import hashlib
    import hmac as hmac_mod

    head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    sig = hmac_mod.new(pem, head + b"." + body, hashlib.sha256).digest()
    token = b".".join((head, body, base64.urlsafe_b64encode(sig).rstrip(b"="))).decode()
    assert reason(verifier, token) == "algorithm"


@pytest.mark.parametrize("alg", ["RS256", "RS512", "PS256", "PS384"])
def test_rsa_public_key(rsa_key: rsa.RSAPrivateKey, alg: str) -> None:
    verifier = Verifier(public_key=rsa_key.public_key())
    token = jwt.encode(claims(), rsa_key, algorithm=alg)
    assert verifier.verify(token, now=NOW).sub == "alice"
    assert reason(verifier, hs(claims())) == "algorithm"


@pytest.mark.parametrize(
    ("curve", "alg"),
    [(ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384"), (ec.SECP521R1(), "ES512")],
)
def test_ec_keys_take_their_curve_algorithm(curve: ec.EllipticCurve, alg: str) -> None:
    key = ec.generate_private_key(curve)
    verifier = Verifier(public_key=key.public_key())
    assert verifier.verify(jwt.encode(claims(), key, algorithm=alg), now=NOW).sub == "alice"
    # Another curve's algorithm named in the header (PyJWT will not sign that way).
    other = "ES384" if alg == "ES256" else "ES256"
    _, body, sig = jwt.encode(claims(), key, algorithm=alg).split(".")
    head = base64.urlsafe_b64encode(json.dumps({"alg": other}).encode()).rstrip(b"=").decode()
    assert reason(verifier, f"{head}.{body}.{sig}") == "algorithm"


def test_ed25519() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    verifier = Verifier(public_key=key.public_key())
    assert verifier.verify(jwt.encode(claims(), key, algorithm="EdDSA"), now=NOW).sub == "alice"
    wrong = ed25519.Ed25519PrivateKey.generate()
    assert reason(verifier, jwt.encode(claims(), wrong, algorithm="EdDSA")) == "signature"


def test_expired_and_leeway(hmac: Verifier) -> None:
    assert reason(hmac, hs(claims(exp=NOW - 6))) == "expired"
    assert hmac.verify(hs(claims(exp=NOW - 4)), now=NOW).sub == "alice"  # within 5 s


def test_not_yet_valid(hmac: Verifier) -> None:
    assert reason(hmac, hs(claims(nbf=NOW + 60))) == "not_yet_valid"
    assert reason(hmac, hs(claims(iat=NOW + 60))) == "not_yet_valid"
    assert hmac.verify(hs(claims(nbf=NOW + 4)), now=NOW).sub == "alice"


def test_audience_and_issuer() -> None:
    verifier = Verifier(secret=SECRET.encode(), audience="kasagi", issuer="https://idp")
    good = claims(aud="kasagi", iss="https://idp")
    assert verifier.verify(hs(good), now=NOW).sub == "alice"
    assert verifier.verify(hs({**good, "aud": ["x", "kasagi"]}), now=NOW).sub == "alice"
    assert reason(verifier, hs({**good, "aud": "other"})) == "audience"
    assert reason(verifier, hs(claims(iss="https://idp"))) == "audience"
    assert reason(verifier, hs({**good, "iss": "https://evil"})) == "issuer"
    assert reason(verifier, hs(claims(aud="kasagi"))) == "issuer"


def test_aud_is_ignored_without_an_audience(hmac: Verifier) -> None:
    assert hmac.verify(hs(claims(aud="whatever")), now=NOW).sub == "alice"


@pytest.mark.parametrize(
    "bad",
    [
        {"sub": ...},
        {"exp": ...},
        {"rooms": ...},
        {"sub": 42},
        {"sub": ""},
        {"sub": "x" * 257},
        {"exp": "tomorrow"},
        {"exp": True},
        {"nbf": "now"},
        {"rooms": ["lobby"]},
        {"rooms": "lobby"},
        {"rooms": {"lobby": "rwx"}},
        {"rooms": {"lobby": "a"}},
        {"rooms": {"lobby": ""}},
        {"rooms": {"lobby": ["r"]}},
        {"rooms": {"bad room": "r"}},
        {"rooms": {"a:b*": "r"}},
        {"rooms": {f"r{i}": "r" for i in range(1001)}},
        {"info": "Alice"},
        {"info": ["Alice"]},
        {"info": {"bio": "x" * MAX_INFO_BYTES}},
    ],
)
def test_claims_that_are_missing_or_ill_typed(hmac: Verifier, bad: dict[str, Any]) -> None:
    assert reason(hmac, hs(claims(**bad))) == "claims"


def test_info_at_the_limit_passes(hmac: Verifier) -> None:
    info = {"b": "x" * (MAX_INFO_BYTES - len('{"b":""}'))}
    assert hmac.verify(hs(claims(info=info)), now=NOW).info == info


def _jwk(key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=kid, **extra)
    return jwk


def test_jwks_keys_by_kid(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = {"keys": [_jwk(rsa_key, "k1", alg="RS256"), _jwk(other, "k2")]}
    verifier = Verifier(jwks=True)
    verifier.set_jwks(parse_jwks(json.dumps(doc).encode()))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    assert verifier.verify(token, now=NOW).sub == "alice"
    # k1 says RS256 only; k2 (no alg) takes every RSA algorithm.
    ps = jwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "k1"})
    assert reason(verifier, ps) == "algorithm"
    assert verifier.verify(
        jwt.encode(claims(), other, algorithm="PS256", headers={"kid": "k2"}), now=NOW
    )
    wrong_kid = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k9"})
    assert reason(verifier, wrong_kid) == "unknown_kid"
    signed_by_other = jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "k1"})
    assert reason(verifier, signed_by_other) == "signature"
    assert reason(verifier, hs(claims(), headers={"kid": "k1"})) == "algorithm"


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"[]",
        b'{"keys": 1}',
        b'{"keys": []}',
        b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}',
        b'{"keys": [{"kty": "RSA", "kid": "broken", "n": "AA", "e": "zz"}]}',
    ],
)
def test_jwks_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_jwks(data)


def test_config_rules(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        Verifier(secret=b"short")
    with pytest.raises(ConfigError):
        Verifier()
    pem = tmp_path / "key.pem"
    pem.write_text("not a key")
    with pytest.raises(ConfigError, match="not a PEM"):
        Verifier.from_config(Config(jwt_public_key=str(pem)))
    assert Verifier.from_config(Config()) is None
    assert Verifier.from_config(Config(jwt_secret=SECRET)) is not None


def test_real_clock(hmac: Verifier) -> None:
    token = hs(claims(exp=time.time() + 60))
    assert hmac.verify(token).sub == "alice"
