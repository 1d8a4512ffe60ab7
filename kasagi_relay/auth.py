"""Connection tokens, Sans-I/O: a JWT in, an `Identity` (or a typed `AuthError`) out.

docs/protocol.md ("Identity") is the contract. `Verifier` holds the keys the relay was
given (`--jwt-secret`, `--jwt-public-key`, or a JWKS set that jwks.py fetches and hands
over with `set_jwks`) and checks one token against them, at a given time, with PyJWT:

- the algorithms follow from the key type, never from the token: HS256/384/512 for a
  secret; RS*/PS* for an RSA key, ES256/384/512 by the EC key's curve, EdDSA for Ed25519
  and Ed448. `none` is never accepted, nor HMAC with a public key (the "algorithm
  confusion" of a token signed with the public key's PEM as an HMAC secret);
- claims: `sub` (a non-empty string), `exp` (a number), `nbf`/`iat` when present,
  `rooms` (an object from pattern to rights `r`, `w` or `rw`), `info` (an object of at most
  1 KiB as compact JSON), `aud`/`iss` when `--jwt-audience`/`--jwt-issuer` are set; the
  times with a clock leeway (`--jwt-leeway`).

Every failure is an `AuthError` with a `reason`, one of REASONS (the label of
kasagi_auth_failures_total), and a message that never quotes the token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from kasagi_relay.config import Config, ConfigError
from kasagi_relay.domain import ROOM_NAME, Identity

__all__ = [
    "HMAC_ALGORITHMS",
    "MAX_INFO_BYTES",
    "MAX_PATTERNS",
    "MAX_SUB_CHARS",
    "MAX_TOKEN_BYTES",
    "MIN_SECRET_BYTES",
    "REASONS",
    "AuthError",
    "Verifier",
    "algorithms_for",
    "parse_jwks",
]

HMAC_ALGORITHMS: Final = ("HS256", "HS384", "HS512")
_RSA: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

# A token longer than this is refused before anything decodes it (a header line is at most
# 8 KiB in websockets anyway; the `auth` message is also under --max-message-bytes).
MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_INFO_BYTES: Final = 1024
MAX_SUB_CHARS: Final = 256
# Every join and delta walks the patterns: bounded per token.
MAX_PATTERNS: Final = 1000
# A shorter HMAC secret can be guessed offline from one token (RFC 7518 3.2: at least the
# hash's size).
MIN_SECRET_BYTES: Final = 32
_RIGHTS: Final = frozenset(("r", "w", "rw", "wr"))

# The labels of kasagi_auth_failures_total.
REASONS: Final = (
    "missing",  # no token within --auth-timeout
    "malformed",  # not a JWT, or too large
    "algorithm",  # an algorithm the key does not allow (none, HMAC with a public key...)
    "signature",
    "unknown_kid",
    "expired",
    "not_yet_valid",
    "audience",
    "issuer",
    "claims",  # a missing or ill-typed claim, rights other than r/w, info too large
    "sub_changed",  # a refresh with another sub
)


class AuthError(Exception):
    """A token that does not authenticate: `reason` (one of REASONS) and a message for
    the client (`error` `unauthorized`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any  # a cryptography key object, or the HMAC secret bytes
    algorithms: tuple[str, ...]


def algorithms_for(key: object) -> tuple[str, ...]:
    """The JWS algorithms a public key may verify; ConfigError for another kind of key."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_BY_CURVE.get(key.curve.name)
        if alg is None:
            raise ConfigError(f"unsupported EC curve {key.curve.name} (P-256, P-384, P-521)")
        return (alg,)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise ConfigError(f"unsupported public key type {type(key).__name__}")


def parse_jwks(data: bytes) -> dict[str | None, _Key]:
    """The keys of a JWKS document by `kid`; ValueError when it is not one, or holds no
    usable public key. Symmetric (`oct`) keys are refused: a key set is public."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" array)')
    keys: dict[str | None, _Key] = {}
    skipped = 0
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
            skipped += 1
            continue
        if entry.get("use") not in (None, "sig"):
            skipped += 1
            continue
        try:
            jwk = jwt.PyJWK(entry)
            allowed = algorithms_for(jwk.key)
        except (jwt.PyJWTError, ConfigError, ValueError, TypeError, KeyError):
            skipped += 1
            continue
        alg = entry.get("alg")
        if alg is not None:
            if alg not in allowed:
                skipped += 1
                continue
            allowed = (alg,)
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) else None] = _Key(jwk.key, allowed)
    if not keys:
        raise ValueError(f"no usable signing key ({skipped} skipped)")
    return keys


class Verifier:
    """The relay's JWT keys and claim rules; `verify(token)` is pure (no I/O)."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        public_key: object | None = None,
        jwks: bool = False,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 5.0,
    ) -> None:
        if sum((secret is not None, public_key is not None, jwks)) != 1:
            raise ConfigError("give one of --jwt-secret, --jwt-public-key or --jwks")
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.uses_jwks = jwks
        self._keys: dict[str | None, _Key] = {}
        if secret is not None:
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
            self._keys[None] = _Key(secret, HMAC_ALGORITHMS)
        elif public_key is not None:
            self._keys[None] = _Key(public_key, algorithms_for(public_key))

    @classmethod
    def from_config(cls, config: Config) -> Verifier | None:
        """The verifier the config asks for; None for an anonymous relay. ConfigError for a
        key that does not load (the JWKS itself is fetched by jwks.py)."""
        public_key = None
        if config.jwt_public_key is not None:
            try:
                with open(config.jwt_public_key, "rb") as f:
                    public_key = serialization.load_pem_public_key(f.read())
            except OSError as exc:
                raise ConfigError(f"cannot read --jwt-public-key: {exc.strerror}") from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"--jwt-public-key is not a PEM public key: {exc}") from None
        secret = config.jwt_secret.encode() if config.jwt_secret is not None else None
        if secret is None and public_key is None and config.jwks is None:
            return None
        return cls(
            secret=secret,
            public_key=public_key,
            jwks=config.jwks is not None,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway_s=config.jwt_leeway_s,
        )

    def set_jwks(self, keys: Mapping[str | None, _Key]) -> None:
        """Replace the key set (jwks.py, after a successful fetch)."""
        self._keys = dict(keys)

    @property
    def kids(self) -> frozenset[str | None]:
        return frozenset(self._keys)

    def verify(self, token: str, now: float | None = None) -> Identity:
        """The identity a token grants at `now` (Unix seconds; default the clock)."""
        if now is None:
            now = time.time()
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError("malformed", f"token longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "not a JWT") from None
        alg = header.get("alg")
        key = self._key_for(header.get("kid"))
        if not isinstance(alg, str) or alg not in key.algorithms:
            raise AuthError("algorithm", f"algorithm {str(alg)[:20]!r} not accepted")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    # Times are checked below, against `now`, with the relay's leeway.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("signature", "bad signature") from None
        except jwt.InvalidAudienceError:
            raise AuthError("audience", "wrong audience (aud)") from None
        except jwt.InvalidIssuerError:
            raise AuthError("issuer", "wrong issuer (iss)") from None
        except jwt.MissingRequiredClaimError as exc:
            reason = {"aud": "audience", "iss": "issuer"}.get(exc.claim, "claims")
            raise AuthError(reason, f"missing claim {exc.claim}") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm", f"algorithm {alg!r} not accepted") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError("malformed", "token does not decode") from None
        return self._identity(claims, now)

    def _key_for(self, kid: object) -> _Key:
        if not self.uses_jwks:
            return self._keys[None]
        if isinstance(kid, str) and kid in self._keys:
            return self._keys[kid]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        raise AuthError("unknown_kid", "no key with this kid")

    def _identity(self, claims: Mapping[str, Any], now: float) -> Identity:
        leeway = self.leeway_s
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_SUB_CHARS:
            raise AuthError("claims", f"sub must be a string of 1 to {MAX_SUB_CHARS} characters")
        if "exp" not in claims:
            raise AuthError("claims", "missing claim exp")
        exp = _time_claim(claims, "exp")
        assert exp is not None
        if now >= exp + leeway:
            raise AuthError("expired", "token expired")
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise AuthError("not_yet_valid", "token not valid yet (nbf)")
        iat = _time_claim(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise AuthError("not_yet_valid", "token issued in the future (iat)")
        return Identity(sub=sub, info=_info(claims), rooms=_rooms(claims), exp=exp)


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError("claims", f"{name} must be a number (Unix seconds)")
    return float(value)


def _rooms(claims: Mapping[str, Any]) -> dict[str, str]:
    if "rooms" not in claims:
        raise AuthError("claims", "missing claim rooms")
    rooms = claims["rooms"]
    if not isinstance(rooms, dict):
        raise AuthError("claims", "rooms must be an object (pattern -> r, w or rw)")
    if len(rooms) > MAX_PATTERNS:
        raise AuthError("claims", f"rooms may hold at most {MAX_PATTERNS} patterns")
    out: dict[str, str] = {}
    for pattern, rights in rooms.items():
        if not _valid_pattern(pattern):
            raise AuthError("claims", f"bad room pattern {str(pattern)[:40]!r}")
        if not isinstance(rights, str) or rights not in _RIGHTS:
            raise AuthError("claims", "rights must be r, w or rw")
        out[pattern] = rights
    return out


def _valid_pattern(pattern: str) -> bool:
    if not pattern.endswith("*"):
        return ROOM_NAME.fullmatch(pattern) is not None
    prefix = pattern[:-1]
    # A prefix of some valid name: "" (every room), or a valid name's start.
    return prefix == "" or ROOM_NAME.fullmatch(prefix) is not None


def _info(claims: Mapping[str, Any]) -> dict[str, Any]:
    info = claims.get("info")
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise AuthError("claims", "info must be an object")
    size = len(json.dumps(info, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_INFO_BYTES:
        raise AuthError("claims", f"info is {size} bytes of JSON, at most {MAX_INFO_BYTES}")
    return info
