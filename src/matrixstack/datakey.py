"""The data directory's own key: secrets at rest are encrypted with it, per-deployment secrets are derived from it.

`<data dir>/secret.key` holds 32 random bytes, created on first use with mode 0600 inside a data directory made
0700 (`private_dir`). `$MATRIXSTACK_SECRET_KEY` (the same 32 bytes, urlsafe base64) replaces the file where several
machines share one database (a portal behind a balancer, a k8s site): every process that reads the stored secrets
needs the same key.

- `encrypt(text)` returns `enc:v1:` + a Fernet token (AES-128-CBC + HMAC-SHA256, the `cryptography` package);
  `decrypt(value)` returns the text, or raises `UserError` when the value was sealed with another key.
- `derive_secret(purpose)` returns a 64-hex-digit HMAC-SHA256 of `purpose` under the key: the same in every process
  that holds the key, stored nowhere (a deployment's engine secret: `derive_secret("engine:NAME")`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from pathlib import Path

from matrixstack.errors import UserError
from matrixstack.paths import data_dir

KEY_FILE = "secret.key"
KEY_ENV = "MATRIXSTACK_SECRET_KEY"
KEY_BYTES = 32
SEALED_PREFIX = "enc:v1:"


def private_dir(path: Path) -> Path:
    """Return `path`, created if missing, with mode 0700 (only its owner may list or enter it)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def key_path() -> Path:
    """Return the key file of this machine's data directory: `<data dir>/secret.key`."""
    return data_dir() / KEY_FILE


def data_key() -> bytes:
    """Return the 32-byte data key: from $MATRIXSTACK_SECRET_KEY, else the key file (created 0600 when missing)."""
    given = os.environ.get(KEY_ENV)
    if given:
        try:
            key = base64.urlsafe_b64decode(given.encode())
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise UserError(
                f"${KEY_ENV} must be {KEY_BYTES} bytes in urlsafe base64: make one with `python -c "
                '"import os,base64;print(base64.urlsafe_b64encode(os.urandom(32)).decode())"`'
            )
        return key
    path = key_path()
    if not path.exists():
        private_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(os.urandom(KEY_BYTES))
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise UserError(
            f"{path} is not a MatrixStack key ({len(key)} bytes, want {KEY_BYTES}): restore it from a "
            "backup; without it the stored secrets cannot be read"
        )
    return key


def _fernet():
    """Return a Fernet sealed with the data key."""
    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(data_key()))


def is_sealed(value: str) -> bool:
    """Return whether `value` is an `encrypt` result rather than clear text."""
    return value.startswith(SEALED_PREFIX)


def encrypt(text: str) -> str:
    """Return `text` sealed with the data key: `enc:v1:` + a Fernet token."""
    return SEALED_PREFIX + _fernet().encrypt(text.encode()).decode()


def decrypt(value: str) -> str:
    """Return the clear text of a value `encrypt` sealed; UserError when another key sealed it."""
    from cryptography.fernet import InvalidToken

    if not is_sealed(value):
        raise UserError("not an encrypted value (it should start with 'enc:v1:')")
    try:
        return _fernet().decrypt(value[len(SEALED_PREFIX) :].encode()).decode()
    except InvalidToken:
        raise UserError(
            f"a stored secret was sealed with another key than {key_path()} (or ${KEY_ENV}): restore "
            "that key, or set the secret again"
        ) from None


def derive_secret(purpose: str) -> str:
    """Return the secret for `purpose` (64 hex digits): HMAC-SHA256 of it under the data key, the same everywhere."""
    return hmac.new(data_key(), purpose.encode(), hashlib.sha256).hexdigest()
