"""The Hub probe (kdpipe.hub): a Hub that does not answer is a one-line error at once, not ~25 s of retries and
a warning per try; HF_HUB_OFFLINE skips the probe; any answer, or a TLS failure, leaves loading to the libraries;
local paths never probe. No network is used: urllib's urlopen is replaced (and huggingface_hub itself stays in
the offline mode conftest set before it was imported)."""

from __future__ import annotations

import http.client
import io
import socket
import ssl
import urllib.error
import urllib.request

import pytest

from kdpipe import hub
from tests.helpers import one_line_error

NO_NAME = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


@pytest.fixture
def probe(monkeypatch):
    """`probe(outcome)`: online mode (HF_HUB_OFFLINE unset), urlopen raising `outcome` or answering when it is
    None, the cached verdict cleared; returns the list of (url, method, timeout) urlopen was called with."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    calls: list[tuple] = []

    def use(outcome: BaseException | None) -> list[tuple]:
        def urlopen(request, timeout):
            calls.append((request.full_url, request.get_method(), timeout))
            if outcome is not None:
                raise outcome
            return io.BytesIO(b"")

        monkeypatch.setattr(urllib.request, "urlopen", urlopen)
        hub.unreachable.cache_clear()
        return calls

    yield use
    hub.unreachable.cache_clear()


def test_a_hub_that_does_not_answer_is_a_one_line_error_before_any_library_call(run_cli, probe, image_folder,
                                                                                 teacher_dir, tmp_path):
    calls = probe(NO_NAME)
    commands = [("--teacher owner/teacher", "cache-teacher", "--teacher", "owner/teacher", "--dataset", image_folder),
                ("--dataset owner/data", "cache-teacher", "--teacher", teacher_dir, "--dataset", "owner/data"),
                ("--student owner/student", "train-student", "--dataset", image_folder, "--alpha", "0",
                 "--student", "owner/student")]
    for flag, *args in commands:
        code, text = run_cli(*args, "--out", tmp_path / "out")
        one_line_error(code, text, flag, "the Hugging Face Hub cannot be reached", "Name or service not known",
                        "offline? pass a local", "HF_HUB_OFFLINE=1")
    assert calls == [("https://huggingface.co", "HEAD", hub.PROBE_TIMEOUT_S)]  # asked once per process
    assert not (tmp_path / "out").exists()


def test_local_paths_never_probe(probe, image_folder, teacher_dir):
    from kdpipe.data import open_dataset
    from kdpipe.teacher import load_teacher

    calls = probe(NO_NAME)
    load_teacher(str(teacher_dir))
    open_dataset(str(image_folder))
    assert calls == []


@pytest.mark.parametrize("outcome, verdict", [
    (None, None),  # it answered
    (urllib.error.HTTPError("https://huggingface.co", 503, "busy", {}, None), None),  # an error status is an answer
    (urllib.error.URLError(ssl.SSLCertVerificationError("self-signed certificate")), None),  # the libraries decide
    (NO_NAME, "https://huggingface.co did not answer: [Errno -2] Name or service not known"),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "did not answer: [Errno 111]"),
    (TimeoutError("timed out"), "did not answer: timed out"),
    (http.client.BadStatusLine("garbage"), None),  # something answered, oddly: the libraries decide
], ids=["answer", "http-error", "tls", "no-name", "refused", "timeout", "odd-answer"])
def test_only_a_failure_to_connect_counts_as_unreachable(probe, outcome, verdict):
    calls = probe(outcome)
    got = hub.unreachable()
    assert got is None if verdict is None else verdict in got
    assert len(calls) == 1


def test_offline_mode_and_another_endpoint(probe, monkeypatch):
    calls = probe(NO_NAME)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the libraries read their caches and never connect: no probe
    assert hub.unreachable() is None and calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    hub.unreachable.cache_clear()
    assert hub.unreachable().startswith("https://hub.example.org did not answer")
    assert calls[0][0] == "https://hub.example.org"
