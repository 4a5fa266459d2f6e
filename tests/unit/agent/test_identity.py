"""Agent identity and trust store: stable across restarts, new when the state directory is copied,
private files private, trusted keys persisted; pairing keys derive from the code alone."""

from __future__ import annotations

import shutil

import pytest
import zmq

from agent.identity import CODE_ALPHABET, CODE_LENGTH, StateDir
from engine.curve_auth import fingerprint, normalize_code, pairing_keys


def test_identity_is_stable_across_restarts(tmp_path):
    first = StateDir(tmp_path / "state").identity
    again = StateDir(tmp_path / "state").identity
    assert first.created and not again.created
    assert (again.agent_id, again.public_key, again.secret_key, again.pairing_code) == \
        (first.agent_id, first.public_key, first.secret_key, first.pairing_code)
    assert zmq.curve_public(first.secret_key.encode()).decode() == first.public_key
    assert len(first.pairing_code) == CODE_LENGTH and set(first.pairing_code) <= set(CODE_ALPHABET)


def test_a_copied_state_directory_gets_a_new_identity_and_no_trust(tmp_path):
    original = StateDir(tmp_path / "home-a")
    original.trust("k" * 40, "desk")
    shutil.copytree(tmp_path / "home-a", tmp_path / "home-b")
    copy = StateDir(tmp_path / "home-b")
    assert copy.identity.created
    assert copy.identity.agent_id != original.identity.agent_id
    assert copy.identity.public_key != original.identity.public_key
    assert not copy.is_trusted("k" * 40)
    assert StateDir(tmp_path / "home-a").identity.agent_id == original.identity.agent_id


def test_another_machine_id_means_a_new_identity(tmp_path, monkeypatch):
    first = StateDir(tmp_path / "state").identity
    monkeypatch.setattr("agent.identity.machine_id", lambda: "another-machine")
    assert StateDir(tmp_path / "state").identity.agent_id != first.agent_id


def test_private_files_are_0600_and_the_directory_0700(tmp_path):
    state = StateDir(tmp_path / "state")
    state.trust("k" * 40, "desk")
    for name in ("agent.key_secret", "pairing.json", "identity.json", "trusted_clients.json"):
        assert (state.path / name).stat().st_mode & 0o777 == 0o600, name
    assert state.path.stat().st_mode & 0o777 == 0o700


def test_trusted_clients_persist(tmp_path):
    state = StateDir(tmp_path / "state")
    assert not state.is_trusted("k" * 40)
    state.trust("k" * 40, "desk")
    assert StateDir(tmp_path / "state").is_trusted("k" * 40)
    assert StateDir(tmp_path / "state").trusted_names() == ["desk"]


def test_a_damaged_key_file_is_replaced_not_trusted(tmp_path):
    first = StateDir(tmp_path / "state").identity
    (tmp_path / "state" / "agent.key").write_text("x" * 40)
    again = StateDir(tmp_path / "state").identity
    assert again.public_key != "x" * 40 and again.agent_id != first.agent_id


def test_cluster_secret_replaces_the_code(tmp_path):
    assert StateDir(tmp_path / "s", cluster_secret="our-lab-secret").identity.pairing_code == "OURLABSECRET"


@pytest.mark.parametrize("typed", ["abcd-2345", "ABCD2345", " abcd 2345 "])
def test_pairing_keys_depend_only_on_the_code(typed):
    assert normalize_code(typed) == "ABCD2345"
    public, secret = pairing_keys(typed)
    assert (public, secret) == pairing_keys("ABCD-2345")
    assert zmq.curve_public(secret.encode()).decode() == public
    assert pairing_keys("ABCD-2346")[0] != public


def test_fingerprint_is_short_hex():
    assert len(fingerprint("a" * 40)) == 16 and int(fingerprint("a" * 40), 16) >= 0
