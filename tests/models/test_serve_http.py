"""The local backend over HTTP: adapters from an fmhub repo at a revision, the OpenAI API, bad input, hot-swap deploys."""

from __future__ import annotations

from http.client import HTTPConnection
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import fmhub, git
from fmhub.serving.backends import backend
from fmhub.serving.config import ServeConfig
from fmhub.serving.sources import declared_adapters, parse_adapters, parse_source
from tests.helpers.serving import complete, http, random_adapter, reference, save_base

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture
def served(repo):
    """A repo with a base and two adapters recorded against it, committed; a local server of base@HEAD on port 0."""
    save_base(repo / "base")
    git(repo, "add", "base")
    git(repo, "commit", "-qm", "base")
    for i, name in enumerate(("a0", "a1")):
        random_adapter(repo / "adapters" / name, seed=20 + i, base=repo / "base")
        fmhub(repo, "adapter", "add", f"adapters/{name}", "--base", "base")
    git(repo, "commit", "-qm", "adapters")
    base = parse_source(f"{repo}/base@HEAD")
    config = ServeConfig(base, declared_adapters("HEAD", base, str(repo)), port=0, gpu_slots=2, admin_token="s3cret")
    server = backend("local").serve(config)
    yield repo, server
    server.stop()


def test_completions_for_adapters_at_a_revision_equal_peft(served):
    repo, server = served
    # the reference reads the adapters from a checkout, the server from the store at HEAD
    for name in ("a0", "a1", "base"):
        status, doc = complete(server.url, name, PROMPT, 8)
        assert status == 200, doc
        [choice] = doc["choices"]
        adapter = None if name == "base" else repo / "adapters" / name
        assert choice["token_ids"] == reference(repo / "base", adapter, PROMPT, 8)
        assert choice["finish_reason"] == "length" and doc["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    status, models = http("GET", server.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["base", "a0", "a1"]
    assert models["data"][1]["parent"] == "base" and models["data"][1]["fmhub"]["tier"] in ("gpu", "cpu")
    # materialized from the store into the cold tier, named by the adapter's tree id at HEAD
    tree = git(repo, "rev-parse", "HEAD:adapters/a0").stdout.decode().strip()
    assert (repo / ".git" / "fmhub" / "serve-cache" / "adapters" / tree / "adapter_model.safetensors").is_file()


def test_streaming_text_and_chat(served):
    _, server = served
    status, plain = complete(server.url, "a0", "hello", 6)
    assert status == 200
    conn = HTTPConnection(server.url.split("//")[1], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "a0", "prompt": "hello", "max_tokens": 6, "temperature": 0,
                                                        "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    events = [line[6:] for line in resp.read().decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert [t for c in chunks for t in c["choices"][0].get("token_ids", [])] == plain["choices"][0]["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    status, chat = http("POST", server.url + "/v1/chat/completions",
                        {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant" and isinstance(chat["choices"][0]["message"]["content"], str)


def test_bad_requests_get_clear_errors_and_the_server_goes_on(served):
    _, server = served
    url = server.url
    cases = [
        (http("POST", url + "/v1/completions", b"{not json"), 400, "not JSON"),
        (http("POST", url + "/v1/completions", [1, 2]), 400, "JSON object"),
        (http("POST", url + "/v1/completions", {"prompt": "x"}), 400, "'model'"),
        (complete(url, "nope", PROMPT, 4), 404, "'nope' does not exist"),
        (complete(url, "a0", {"x": 1}, 4), 400, "'prompt'"),
        (complete(url, "a0", PROMPT, 4, temperature=5), 400, "'temperature'"),
        (complete(url, "a0", list(range(1, 126)), 8), 400, "maximum context length is 128"),
        (http("GET", url + "/v2/nothing"), 404, "no such endpoint"),
        (http("POST", url + "/fmhub/adapters", {"adapters": []}), 401, "admin token"),
    ]
    for (status, doc), want_status, want_text in cases:
        assert status == want_status, doc
        assert want_text in doc["error"]["message"], doc
    assert cases[3][0][1]["error"]["code"] == "model_not_found"
    assert complete(url, "a0", PROMPT, 4)[0] == 200
    _, metrics = http("GET", url + "/metrics")
    assert 'fmhub_http_errors_total{status="400"} 6' in metrics
    assert 'fmhub_requests_total{adapter="a0"}' in metrics and "fmhub_decode_step_seconds_bucket" in metrics
    status, health = http("GET", url + "/health")
    assert status == 200 and health["status"] == "ok" and health["adapters"] == 2


def test_client_disconnect_mid_stream_cancels_only_that_request(served):
    _, server = served
    engine, forward = server.engine, server.engine.forward
    # decode steps slow enough that the stream cannot finish before the hang-up is seen
    engine.forward = lambda *a: (time.sleep(0.03), forward(*a))[1]
    host, port = server.url.split("//")[1].split(":")
    body = json.dumps({"model": "a0", "prompt": PROMPT, "max_tokens": 110, "temperature": 0, "ignore_eos": True, "stream": True})
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    got = b""
    while b"data: " not in got:  # the first token arrived
        got += sock.recv(4096)
    sock.close()
    status, doc = complete(server.url, "a1", PROMPT, 5)  # others are served meanwhile
    assert status == 200 and len(doc["choices"][0]["token_ids"]) == 5
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, metrics = http("GET", server.url + "/metrics")
        if 'fmhub_requests_finished_total{reason="cancelled"} 1' in metrics:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the disconnected stream was never cancelled")
    assert http("GET", server.url + "/health")[1]["running"] == 0


def test_adapter_for_another_base_and_stale_base_are_refused(served, tmp_path):
    repo, server = served
    other = save_base(tmp_path / "other", hidden_size=32, intermediate_size=64, num_attention_heads=2)
    random_adapter(tmp_path / "alien", seed=3, base=other)
    # the base moves on: a0 was recorded against the old weights
    save_base(repo / "base", seed=5)
    git(repo, "commit", "-qam", "base v2")
    new_base = parse_source(f"{repo}/base@HEAD")
    specs = parse_adapters([f"alien={tmp_path / 'alien'}", f"a0={repo}/adapters/a0@HEAD"])
    srv = backend("local").serve(ServeConfig(new_base, specs, port=0))
    try:
        status, doc = complete(srv.url, "alien", PROMPT, 3)
        assert status == 409 and "another base model" in doc["error"]["message"]
        status, doc = complete(srv.url, "a0", PROMPT, 3)
        assert status == 409 and "weights differ from the served base" in doc["error"]["message"]
        assert complete(srv.url, "base", PROMPT, 3)[0] == 200
    finally:
        srv.stop()


def test_deploy_hot_swaps_changed_adapters_without_restart(served):
    repo, server = served
    before = complete(server.url, "a1", PROMPT, 6)[1]["choices"][0]["token_ids"]
    random_adapter(repo / "adapters" / "a1", seed=99, base=repo / "base")  # retrained
    random_adapter(repo / "adapters" / "a2", seed=42, base=repo / "base")  # new
    fmhub(repo, "adapter", "add", "adapters/a1", "--base", "base")
    fmhub(repo, "adapter", "add", "adapters/a2", "--base", "base")
    git(repo, "rm", "-rq", "adapters/a0")
    git(repo, "commit", "-qm", "retrain a1, add a2, drop a0")
    out = fmhub(repo, "deploy", "--url", server.url, "--rev", "HEAD", "--base", "base", "--json", "--token", "s3cret")
    report = json.loads(out.stdout)
    assert report["added"] == ["a2"] and report["updated"] == ["a1"] and report["removed"] == ["a0"]
    after = complete(server.url, "a1", PROMPT, 6)[1]["choices"][0]["token_ids"]
    assert after == reference(repo / "base", repo / "adapters" / "a1", PROMPT, 6) and after != before
    assert complete(server.url, "a2", PROMPT, 6)[1]["choices"][0]["token_ids"] == reference(repo / "base", repo / "adapters" / "a2", PROMPT, 6)
    assert complete(server.url, "a0", PROMPT, 3)[0] == 404
    again = json.loads(fmhub(repo, "deploy", "--url", server.url, "--rev", "HEAD", "--base", "base", "--json", "--token", "s3cret").stdout)
    assert again["unchanged"] == ["a1", "a2"] and not again["added"] + again["updated"] + again["removed"]
    bad = fmhub(repo, "deploy", "--url", server.url, "--rev", "HEAD", check=False)
    assert bad.returncode == 1 and b"admin token" in bad.stderr


def _start_cli(repo, *args):
    """``fmhub serve ARGS`` in the background; returns the process and the URL it printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fmhub", "serve", *args], cwd=repo, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    line = proc.stdout.readline().decode()
    if " at http://" not in line:
        proc.kill()
        raise AssertionError(line + proc.stderr.read().decode())
    return proc, line


def test_fmhub_serve_cli(repo, tmp_path):
    save_base(repo / "base")
    random_adapter(tmp_path / "ads" / "x", seed=1, base=repo / "base")
    proc, line = _start_cli(repo, "--base", "base", "--adapters", str(tmp_path / "ads"), "--port", "0", "--gpu-slots", "1")
    try:
        assert "serving base with 1 adapter(s) at http://127.0.0.1:" in line
        url = line.split(" at ")[1].split()[0]
        status, doc = complete(url, "x", PROMPT, 4)
        assert status == 200 and doc["choices"][0]["token_ids"] == reference(repo / "base", tmp_path / "ads" / "x", PROMPT, 4)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = fmhub(repo, "serve", "--base", "base", "--eviction", "random", check=False)
    assert bad.returncode == 1 and b"eviction 'random'" in bad.stderr
    shutil.rmtree(tmp_path / "ads")


def test_serve_section_of_fmhub_yaml(served):
    repo, server = served
    (repo / "fmhub.yaml").write_text("serve:\n  base: base@HEAD\n  declared: HEAD\n  port: 0\n  gpu_slots: 1\n  eviction: lfu\n")
    proc, line = _start_cli(repo)
    try:
        url = line.split(" at ")[1].split()[0]
        assert "with 2 adapter(s)" in line
        status, doc = complete(url, "a1", PROMPT, 4)
        assert status == 200 and doc["choices"][0]["token_ids"] == reference(repo / "base", repo / "adapters" / "a1", PROMPT, 4)
    finally:
        proc.terminate()
        proc.wait(30)
    (repo / "fmhub.yaml").write_text("serve:\n  base: base@HEAD\n  gpu_slot: 1\n")
    bad = fmhub(repo, "serve", check=False)
    assert bad.returncode == 1 and b"fmhub.yaml:3: serve.gpu_slot: unknown key" in bad.stderr


def test_disk_tier_materializes_from_the_store_and_evicts_by_size(served, tmp_path):
    from fmhub.base.errors import ServeError
    from fmhub.serving.cache import DiskTier

    repo, _ = served
    specs = {a.name: a.source for a in declared_adapters("HEAD", parse_source(f"{repo}/base@HEAD"), str(repo))}
    size = sum(f.stat().st_size for f in (repo / "adapters" / "a0").iterdir() if f.is_file())
    disk = DiskTier(str(tmp_path / "cold"), int(size * 1.5), "lru")
    path0, hit0 = disk.path_for(specs["a0"], specs["a0"].version, "a0", set())
    assert not hit0 and (tmp_path / "cold" / specs["a0"].version / "adapter_model.safetensors").read_bytes() == \
        (repo / "adapters" / "a0" / "adapter_model.safetensors").read_bytes()  # byte-identical to the committed file
    assert disk.path_for(specs["a0"], specs["a0"].version, "a0", set()) == (path0, True)
    disk.path_for(specs["a1"], specs["a1"].version, "a1", set())
    assert not os.path.exists(path0) and disk.used <= disk.limit  # a0 made room for a1
    # an adapter in use is never evicted, even over the limit
    disk.path_for(specs["a0"], specs["a0"].version, "a0", {specs["a1"].version})
    assert disk.holds(specs["a1"].version) and disk.holds(specs["a0"].version)
    tiny = DiskTier(str(tmp_path / "tiny"), 100, "lru")
    with pytest.raises(ServeError) as info:
        tiny.path_for(specs["a0"], specs["a0"].version, "a0", set())
    assert info.value.status == 507 and "--disk-cache-mb" in str(info.value)
    assert os.listdir(tmp_path / "tiny") == []  # nothing half-written left behind
