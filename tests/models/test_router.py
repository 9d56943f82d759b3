"""Composition of experts: the router's accuracy on separable tasks, its fallback, its file, and ``"model": "auto"`` over HTTP."""

from __future__ import annotations

import json
import random
from http.client import HTTPConnection

import pytest

from fmhub.base.errors import FmhubError
from fmhub.serving.router import Router
from fmhub.serving.backends import backend
from fmhub.serving.config import ServeConfig
from fmhub.serving.sources import parse_adapters, parse_source
from tests.helpers.serving import complete, http, random_adapter, save_base

VOCAB = {
    "legal": "contract plaintiff defendant court statute clause liability tort jurisdiction appeal verdict counsel lawsuit "
             "breach indemnity warranty arbitration damages injunction precedent tribunal affidavit".split(),
    "cooking": "recipe oven simmer garlic onion butter flour bake saute whisk teaspoon tablespoon boil pan skillet dough "
               "season roast knead stew pepper braise".split(),
    "code": "function variable compile python loop array return class import debug integer string pointer recursion "
            "syntax module lambda compiler exception thread refactor".split(),
}
FILLER = "the a of and to in is for with on that this it by as at from we please can you".split()


def texts(task: str, n: int, seed: int, length: int = 12, topical: float = 0.4) -> list[str]:
    """``n`` texts of ``length`` words, a ``topical`` share from the task's vocabulary, the rest common filler."""
    rng = random.Random(f"{task}/{seed}")
    return [" ".join(rng.choice(VOCAB[task]) if rng.random() < topical else rng.choice(FILLER) for _ in range(length))
            for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> tuple[Router, list[tuple[str, str]]]:
    router = Router.fit({t: texts(t, 30, seed=1) for t in VOCAB}, min_confidence=0.5, fallback="base")
    held_out = [(t, x) for t in VOCAB for x in texts(t, 60, seed=2)]  # other seed: texts never seen in training
    return router, held_out


def accuracy(router: Router, held_out: list[tuple[str, str]]) -> float:
    return sum(router.route(x)[0] == t for t, x in held_out) / len(held_out)


def test_routes_held_out_texts_to_their_task(trained):
    router, held_out = trained
    assert router.classes == ["code", "cooking", "legal"]
    assert accuracy(router, held_out) >= 0.9
    name, confidence = router.route("Preheat the oven, whisk the butter and flour, then bake the dough")
    assert name == "cooking" and confidence > 0.8
    probs = router.probabilities("the court found the defendant liable for breach of contract")
    assert max(probs, key=probs.get) == "legal" and abs(sum(probs.values()) - 1) < 1e-9


def test_descriptions_alone_route_and_combine_with_examples():
    descriptions = {t: f"This adapter answers {t} questions about " + ", ".join(words) for t, words in VOCAB.items()}
    held_out = [(t, x) for t in VOCAB for x in texts(t, 40, seed=3)]
    assert accuracy(Router.fit(None, descriptions), held_out) >= 0.9
    both = Router.fit({t: texts(t, 30, seed=1) for t in VOCAB}, descriptions)
    assert accuracy(both, held_out) >= 0.9 and both.training["descriptions"] == sorted(VOCAB)
    # an adapter known only by its description sits beside adapters with examples; the examples' filler words
    # pull towards their adapters (see the module doc), so this holds for clearly topical texts
    mixed = Router.fit({"legal": texts("legal", 20, 1), "code": texts("code", 20, 1)}, {"cooking": descriptions["cooking"]})
    topical = [(t, x) for t in VOCAB for x in texts(t, 40, seed=3, topical=0.7)]
    assert mixed.classes == ["code", "cooking", "legal"] and accuracy(mixed, topical) >= 0.9


def test_unsure_routes_go_to_the_fallback(trained):
    router, _ = trained
    # nothing the router knows: every adapter equally likely, 1/3 < 0.5
    name, confidence = router.route("zzyzx qwv")
    assert name == "base" and confidence == pytest.approx(1 / 3)
    assert router.route("")[0] == "base"
    assert Router.fit({t: texts(t, 30, seed=1) for t in VOCAB}).route("zzyzx qwv")[0] in VOCAB  # no threshold, no fallback
    # an imbalanced training set does not make one adapter the default: classes weigh the same
    skewed = Router.fit({"legal": texts("legal", 200, 1), "code": texts("code", 5, 1)})
    assert skewed.probabilities("zzyzx") == {"code": pytest.approx(0.5), "legal": pytest.approx(0.5)}
    assert accuracy(skewed, [(t, x) for t in ("legal", "code") for x in texts(t, 40, 4)]) >= 0.9


def test_bad_training_input_is_refused():
    with pytest.raises(FmhubError, match="needs a fallback"):
        Router.fit({"a": ["x y"], "b": ["z w"]}, min_confidence=0.6)
    with pytest.raises(FmhubError, match="no example text and no description for adapter"):
        Router.fit({"a": ["x y"], "b": ["  "]})
    with pytest.raises(FmhubError, match="at least one adapter"):
        Router.fit({})
    with pytest.raises(FmhubError, match=r"\[0, 1\)"):
        Router.fit({"a": ["x"]}, min_confidence=1.5, fallback="base")


def test_save_load_round_trip_routes_identically(trained, tmp_path):
    router, held_out = trained
    path = tmp_path / "router.json"
    router.save(str(path))
    doc = json.loads(path.read_text())
    assert doc["format"] == "fmhub-router" and doc["version"] == 1 and doc["classes"] == router.classes
    assert len(doc["vocab"]) == len(doc["idf"]) == len(doc["weights"]) and doc["fallback"] == "base"
    loaded = Router.load(str(path))
    for _, x in held_out + [("", "zzyzx"), ("", "")]:
        assert loaded.route(x) == router.route(x)
        assert loaded.probabilities(x) == router.probabilities(x)  # exactly: what is saved is what routed
    # deterministic: the same inputs give the same file
    again = Router.fit({t: texts(t, 30, seed=1) for t in VOCAB}, min_confidence=0.5, fallback="base")
    assert again.to_json() == router.to_json()

    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(FmhubError, match="upgrade fmhub"):
        Router.load(str(path))
    path.write_text('{"format": "something else"}')
    with pytest.raises(FmhubError, match="not an fmhub router"):
        Router.load(str(path))
    path.write_text("{oops")
    with pytest.raises(FmhubError, match="not JSON"):
        Router.load(str(path))
    with pytest.raises(FmhubError, match="cannot read router"):
        Router.load(str(tmp_path / "missing.json"))


# -- "model": "auto" through the local server --------------------------------------------------

LEGAL = "the court ruled the contract clause void"  # short: the tiny model's context is 128 byte tokens
COOKING = "simmer the garlic and onion in butter"


@pytest.fixture(scope="module")
def routed_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routed")
    base = save_base(tmp / "base")
    for i, name in enumerate(("legal", "cooking")):
        random_adapter(tmp / name, seed=30 + i, base=base)
    router = Router.fit({"legal": texts("legal", 30, 1), "cooking": texts("cooking", 30, 1)}, min_confidence=0.55, fallback="base")
    router.save(str(tmp / "router.json"))
    assert router.route(LEGAL)[0] == "legal" and router.route(COOKING)[0] == "cooking"
    specs = parse_adapters([f"legal={tmp / 'legal'}", f"cooking={tmp / 'cooking'}"])
    config = ServeConfig(parse_source(str(base)), specs, port=0, gpu_slots=2, cache_dir=str(tmp / "cache"),
                         backend_options={"router": str(tmp / "router.json")})
    server = backend("local").serve(config)
    yield tmp, server, router
    server.stop()


def test_model_auto_is_served_by_the_routed_adapter(routed_server):
    tmp, server, router = routed_server
    for prompt, want in ((LEGAL, "legal"), (COOKING, "cooking")):
        status, doc = complete(server.url, "auto", prompt, 6)
        assert status == 200, doc
        assert doc["model"] == want and doc["fmhub"]["routed_to"] == want
        assert doc["fmhub"]["confidence"] == pytest.approx(router.route(prompt)[1], abs=1e-6)
        direct = complete(server.url, want, prompt, 6)[1]
        assert doc["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        assert "fmhub" not in direct  # only routed requests say where they went
    # the two adapters really differ here, so a wrong route could not pass for a right one
    assert complete(server.url, "legal", LEGAL, 6)[1]["choices"][0]["token_ids"] != \
        complete(server.url, "cooking", LEGAL, 6)[1]["choices"][0]["token_ids"]
    # unsure: the fallback, the bare base model
    status, doc = complete(server.url, "auto", "zzyzx qwv", 4)
    assert status == 200 and doc["model"] == "base" and doc["fmhub"]["routed_to"] == "base"
    assert doc["choices"][0]["token_ids"] == complete(server.url, "base", "zzyzx qwv", 4)[1]["choices"][0]["token_ids"]
    _, metrics = http("GET", server.url + "/metrics")
    assert 'fmhub_routed_requests_total{adapter="legal"} 1' in metrics


def test_model_auto_in_chat_and_streams_routes_on_the_last_user_message(routed_server):
    _, server, _ = routed_server
    messages = [{"role": "user", "content": LEGAL}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": COOKING}]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    status, chat = http("POST", server.url + "/v1/chat/completions", {"model": "auto", **body})
    assert status == 200 and chat["model"] == "cooking" and chat["fmhub"]["routed_to"] == "cooking"
    direct = http("POST", server.url + "/v1/chat/completions", {"model": "cooking", **body})[1]
    assert chat["choices"][0]["message"] == direct["choices"][0]["message"]

    conn = HTTPConnection(server.url.split("//")[1], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "auto", "prompt": LEGAL, "max_tokens": 5, "temperature": 0,
                                                        "ignore_eos": True, "stream": True}), {"Content-Type": "application/json"})
    events = [e[6:] for e in conn.getresponse().read().decode().split("\n\n") if e.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["model"] == "legal" and c["fmhub"]["routed_to"] == "legal" for c in chunks)
    tokens = [t for c in chunks for t in c["choices"][0].get("token_ids", [])]
    assert tokens == complete(server.url, "legal", LEGAL, 5)[1]["choices"][0]["token_ids"]
    # token-id prompts are decoded for routing
    status, doc = complete(server.url, "auto", list(COOKING.encode()), 3)
    assert status == 200 and doc["model"] == "cooking"


def test_model_auto_without_a_router_is_404_with_a_hint(routed_server):
    tmp, _, _ = routed_server
    config = ServeConfig(parse_source(str(tmp / "base")), parse_adapters([f"legal={tmp / 'legal'}"]), port=0,
                         cache_dir=str(tmp / "cache2"))
    server = backend("local").serve(config)
    try:
        status, doc = complete(server.url, "auto", LEGAL, 3)
        assert status == 404 and doc["error"]["code"] == "model_not_found"
        assert "no router" in doc["error"]["message"] and "backend_options" in doc["error"]["message"]
        assert complete(server.url, "legal", LEGAL, 3)[0] == 200
    finally:
        server.stop()


def test_a_bad_router_file_stops_the_server_from_starting(routed_server):
    tmp, _, _ = routed_server
    (tmp / "bad.json").write_text("[]")
    config = ServeConfig(parse_source(str(tmp / "base")), [], port=0, cache_dir=str(tmp / "cache3"),
                         backend_options={"router": str(tmp / "bad.json")})
    with pytest.raises(FmhubError, match="not an fmhub router file"):
        backend("local").serve(config)
