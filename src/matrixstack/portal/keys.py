"""API keys: making a new secret key, hashing it for storage, and the short prefix shown instead of it."""

from __future__ import annotations

import hashlib
import secrets

KEY_SCHEME = "sk-"
PREFIX_CHARS = 12  # "sk-" and 9 characters of the secret: enough to tell keys apart, useless to an attacker


def new_key() -> str:
    """Return a new plaintext API key: "sk-" followed by 43 URL-safe random characters (256 bits)."""
    return KEY_SCHEME + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    """Return the sha256 hex digest of a key: the only form of it the database keeps."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def key_prefix(plaintext: str) -> str:
    """Return the display prefix of a key (its first 12 characters)."""
    return plaintext[:PREFIX_CHARS]
