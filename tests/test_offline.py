"""With HF_HUB_OFFLINE=1, training and auditing open no network connection."""

import socket

import pytest

from fdiv_eval.cli import main


@pytest.fixture
def network_attempts(monkeypatch):
    """Record and block every connection attempt to a host other than loopback."""
    attempts = []
    original_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            attempts.append(address)
            raise OSError(f"network access blocked by the test: {address}")
        return original_connect(self, address)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return attempts


def test_run_opens_no_connection(tiny_suite, network_attempts, capsys):
    assert main(["--no-progress", "train", str(tiny_suite), "--method", "js", "--steps", "1"]) == 0
    assert main(["--no-progress", "audit", str(tiny_suite), "--model", "embedded:austen", "--no-base"]) == 0
    assert network_attempts == []


def test_trust_remote_code_is_opt_in(tmp_path):
    from fdiv_eval.suite import load_suite

    plain = tmp_path / "plain.yaml"
    common = "name: opt\nbase_model: embedded:austen\ntarget: {type: word_list, words: [she], epsilon: 0.001}\n"
    plain.write_text(common)
    explicit_off = tmp_path / "off.yaml"
    explicit_off.write_text(common + "trust_remote_code: false\n")
    opted_in = tmp_path / "on.yaml"
    opted_in.write_text(common + "trust_remote_code: true\n")

    assert load_suite(str(plain)).trust_remote_code is False
    assert load_suite(str(opted_in)).trust_remote_code is True
    # The default-off field leaves the hash of suites that never mention it unchanged.
    assert load_suite(str(explicit_off)).content_hash() == load_suite(str(plain)).content_hash()
    assert load_suite(str(opted_in)).content_hash() != load_suite(str(plain)).content_hash()
