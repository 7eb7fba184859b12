"""chatserver_auth: signed identities, for chatserver --auth-secret.

A site that hosts the chat vouches for its users' names with a JWT (HS256)
signed with a secret it shares with chatserver; the page passes it on as
?token=.  This module is imported only with --auth-secret (or the `token`
subcommand) and needs PyJWT (pip install chatserver[auth]).  Claims:

  sub    the name (the same rules as a nickname); required
  exp    when the token expires; required
  rooms  optional: the rooms (names, or patterns with *) it may join
  mod    optional: true, or the rooms (names or patterns) it moderates
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import unicodedata
from pathlib import Path

import jwt

from chatserver import Identity, Refused, name_problem

ALGORITHM = "HS256"
SECRET_MIN_BYTES = 32  # RFC 7518 3.2: a key at least as long as the hash
TOKEN_TTL_S = 3600


def load_secret(path: str) -> bytes:
    """The HMAC secret in the file at `path` (one trailing newline dropped);
    ValueError with a one-line reason if it will not do."""
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the auth secret {path}: {exc.strerror}") from None
    secret = secret[:-1] if secret.endswith(b"\n") else secret
    if len(secret) < SECRET_MIN_BYTES:
        raise ValueError(f"the auth secret in {path} is shorter than {SECRET_MIN_BYTES} bytes "
                         "(make one: head -c 48 /dev/urandom | base64 > FILE)")
    return secret


def covers(patterns: object, room: str) -> bool:
    """Whether a `rooms` or `mod` claim covers `room`: a list of room names,
    where * stands for any run of characters."""
    if not isinstance(patterns, list):
        return False
    return any(isinstance(pattern, str) and re.fullmatch(
        ".*".join(map(re.escape, pattern.split("*"))), room) for pattern in patterns)


def verify(token: str, secret: bytes, room: str) -> Identity:
    """The identity a token vouches for, in `room`; Refused (401 for a bad
    token, 403 for a good one that does not open this room) otherwise.  The
    reason never quotes the token."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        raise Refused(401, "your sign-in token has expired") from None
    except jwt.InvalidSignatureError:
        raise Refused(401, "your sign-in token is not signed by this server's secret") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Refused(401, f"your sign-in token lacks its {exc.claim!r} claim") from None
    except jwt.InvalidTokenError as exc:
        raise Refused(401, f"your sign-in token is invalid ({type(exc).__name__})") from None
    name = claims["sub"]
    if not isinstance(name, str) or name_problem(unicodedata.normalize("NFC", name)):
        raise Refused(401, "your sign-in token's name is not a valid name")
    if "rooms" in claims and not covers(claims["rooms"], room):
        raise Refused(403, f"your sign-in token does not open the room {room}")
    mod = claims.get("mod", False)
    return Identity(unicodedata.normalize("NFC", name),
                    mod is True or covers(mod, room))


def make_token(secret: bytes, name: str, ttl: float = TOKEN_TTL_S, mod: bool | list = False,
               rooms: list[str] | None = None) -> str:
    claims: dict[str, object] = {"sub": name, "exp": int(time.time() + ttl)}
    if rooms:
        claims["rooms"] = rooms
    if mod:
        claims["mod"] = mod
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def token_main(argv: list[str]) -> None:
    """chatserver token: print a signed token (for small sites and tests)."""
    parser = argparse.ArgumentParser(
        prog="chatserver token",
        description="Print a sign-in token for chatserver --auth-secret FILE.")
    parser.add_argument("--secret-file", required=True, help="the file given to --auth-secret")
    parser.add_argument("--name", required=True, help="the name it vouches for (sub)")
    parser.add_argument("--mod", nargs="*", metavar="ROOM", default=None,
                        help="a moderator: of every room, or of the rooms given")
    parser.add_argument("--rooms", nargs="+", metavar="ROOM",
                        help="only these rooms may be joined (* matches any characters)")
    parser.add_argument("--ttl", type=float, default=TOKEN_TTL_S,
                        help=f"seconds it is valid (default {TOKEN_TTL_S})")
    args = parser.parse_args(argv)
    problem = name_problem(unicodedata.normalize("NFC", args.name))
    if problem:
        parser.exit(2, f"chatserver token: --name refused: {problem}\n")
    try:
        secret = load_secret(args.secret_file)
    except ValueError as exc:
        parser.exit(2, f"chatserver token: {exc}\n")
    mod = False if args.mod is None else (args.mod or True)
    sys.stdout.write(make_token(secret, args.name, args.ttl, mod, args.rooms) + "\n")
