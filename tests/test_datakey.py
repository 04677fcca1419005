"""The data key: created 0600 in a 0700 directory, seals and opens secrets, refuses another key's seal, derives
the same secret for the same purpose and different ones for different purposes."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from matrixstack import datakey
from matrixstack.errors import UserError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIXSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(datakey.KEY_ENV, raising=False)


def test_key_file_is_private_and_stable():
    first = datakey.data_key()
    path = datakey.key_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert datakey.data_key() == first and len(first) == datakey.KEY_BYTES


def test_seal_round_trip_and_no_clear_text():
    sealed = datakey.encrypt("sk-planted-secret")
    assert datakey.is_sealed(sealed) and "sk-planted-secret" not in sealed
    assert datakey.decrypt(sealed) == "sk-planted-secret"


def test_another_key_cannot_open(monkeypatch):
    sealed = datakey.encrypt("sk-x")
    monkeypatch.setenv(datakey.KEY_ENV, base64.urlsafe_b64encode(os.urandom(32)).decode())
    with pytest.raises(UserError, match="another key"):
        datakey.decrypt(sealed)


def test_bad_env_key_is_a_user_error(monkeypatch):
    monkeypatch.setenv(datakey.KEY_ENV, "short")
    with pytest.raises(UserError, match="32 bytes"):
        datakey.data_key()


def test_derived_secrets_differ_by_purpose():
    a, b = datakey.derive_secret("engine:a"), datakey.derive_secret("engine:b")
    assert a != b and a == datakey.derive_secret("engine:a") and len(a) == 64
