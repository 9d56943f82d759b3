"""`fmhub serve` through the official `openai` client: what OpenAI's API promises, checked against transformers.

One server for the module: a tiny Llama with a character tokenizer whose
chat template writes its own BOS, and one adapter that cannot load. Expected
values come from an independent computation: the same weights run by
transformers (log-softmax of its logits, penalties applied by hand), and the
tokenizer's own `apply_chat_template`.
"""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmhub.serving.backends import backend
from fmhub.serving.config import ServeConfig
from fmhub.serving.sources import parse_adapters, parse_source
from tests.helpers.serving import http, save_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEMPLATE = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
NO_EOS = {"ignore_eos": True}


def _char_tokenizer(model_dir: Path) -> None:
    """Characters in, one token each (BOS added); ids past them decode as two letters, so every id of the 512 is text
    and stop strings span tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{chr(c): c - 28 for c in range(32, 127)}}
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    vocab.update({p: 99 + i for i, p in enumerate(pairs[: 512 - 99])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve-openai")
    save_base(root / "base")
    _char_tokenizer(root / "base")
    broken = root / "ads" / "broken"  # passes the start-up check; its load fails (before any token of a request)
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    config = ServeConfig(parse_source(str(root / "base")), parse_adapters([str(root / "ads")]), port=0, gpu_slots=2,
                         cache_dir=str(root / "cache"))
    server = backend("local").serve(config)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    tok = AutoTokenizer.from_pretrained(root / "base")
    yield server, client, model, tok
    server.stop()


def _greedy_reference(model, prompt: list[int], n: int, bias: dict | None = None, presence: float = 0.0,
                      frequency: float = 0.0) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens with OpenAI's logits processing done by hand on transformers' logits, and each step's log-softmax."""
    ids, out, lps = list(prompt), [], []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for t, b in (bias or {}).items():
            logits[t] += b
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float() if out else torch.zeros_like(logits)
        logits -= frequency * counts + presence * (counts > 0).float()
        lps.append(torch.log_softmax(logits, -1))
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, lps


def _piece(tok, token: int) -> str:
    """One token's text as the server shows it (special tokens are no text)."""
    return tok.decode([token], skip_special_tokens=True)


def _encode(tok, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    got = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(got["input_ids"] if hasattr(got, "keys") else got)


def test_a_stop_string_spanning_tokens_never_leaks(env):
    _, client, _, tok = env
    whole = client.completions.create(model="base", prompt="hello", max_tokens=24, temperature=0, extra_body=NO_EOS)
    text, ids = whole.choices[0].text, whole.choices[0].token_ids
    pieces = [_piece(tok, t) for t in ids]
    assert "".join(pieces) == text
    # a stop made of the last character of one token and the first of the next, first seen at that boundary
    k, stop = next((k, pieces[k][-1] + pieces[k + 1][0]) for k in range(len(pieces) - 1) if pieces[k] and pieces[k + 1]
                   and text.find(pieces[k][-1] + pieces[k + 1][0]) == len("".join(pieces[: k + 1])) - 1)
    want = text[: text.find(stop)]
    got = client.completions.create(model="base", prompt="hello", max_tokens=24, temperature=0, stop=[stop], extra_body=NO_EOS)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == k + 2  # through the token that completed the stop
    chunks = list(client.completions.create(model="base", prompt="hello", max_tokens=24, temperature=0, stop=stop, stream=True,
                                            extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], max_tokens=24, temperature=0,
                                          extra_body=NO_EOS)
    ctext = chat.choices[0].message.content
    cstop = ctext[3:6]
    streamed = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], max_tokens=24,
                                              temperature=0, stop=[cstop], stream=True, extra_body=NO_EOS)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ctext[: ctext.find(cstop)]
    # text that only begins like a stop is held back, then given out when the generation ends
    almost = text[-2:] + "\x7f"
    tail = client.completions.create(model="base", prompt="hello", max_tokens=24, temperature=0, stop=almost, stream=True,
                                     extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in tail) == text


def test_a_stop_inside_a_token_keeps_the_text_before_it_when_streamed(env):
    """A token that spells text and then a stop ("ga" with stop "a"), after text held for another stop: streamed, the "g"
    and the held text come out as they do whole (they were dropped with the token), with the token's log-probability."""
    _, client, _, tok = env
    whole = client.completions.create(model="base", prompt="hello", max_tokens=24, temperature=0, extra_body=NO_EOS)
    pieces = [_piece(tok, t) for t in whole.choices[0].token_ids]
    k = next(k for k in range(1, len(pieces)) if len(pieces[k]) == 2 and pieces[k - 1]
             and pieces[k][1] not in "".join(pieces[:k]) + pieces[k][0])
    stops = [pieces[k][1], pieces[k - 1][-1] + "\x7f"]  # the second only holds back the character before the token
    want = "".join(pieces[:k]) + pieces[k][0]
    ask = dict(model="base", prompt="hello", max_tokens=24, temperature=0, stop=stops, logprobs=1, extra_body=NO_EOS)
    got = client.completions.create(**ask)
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    chunks = [c for c in client.completions.create(**ask, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == got.choices[0].logprobs.tokens
    chat = [c for c in client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], max_tokens=24,
                                                      temperature=0, stop=stops[:1], stream=True, extra_body=NO_EOS) if c.choices]
    full = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hello"}], max_tokens=24,
                                          temperature=0, stop=stops[:1], extra_body=NO_EOS)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == full.choices[0].message.content


def test_chat_template_bos_is_not_doubled_and_text_parts_are_read(env):
    _, client, model, tok = env
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    ids = _chat_ids(tok, messages)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    got = client.chat.completions.create(model="base", messages=messages, max_tokens=5, temperature=0, extra_body=NO_EOS)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].token_ids == _greedy_reference(model, ids, 5)[0]
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]
    joined = [messages[0], {"role": "user", "content": "hi\nthere"}]
    by_parts = client.chat.completions.create(model="base", messages=parts, max_tokens=5, temperature=0, extra_body=NO_EOS)
    assert by_parts.usage.prompt_tokens == len(_chat_ids(tok, joined))
    assert by_parts.choices[0].token_ids == _greedy_reference(model, _chat_ids(tok, joined), 5)[0]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="base", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert "'image_url' are not supported" in info.value.body["message"]


def test_a_chat_template_that_refuses_the_messages_is_a_400(env):
    """Mistral's and Llama 2's templates raise_exception on roles that do not alternate: the client's fault, as in vLLM."""
    server, client, _, _ = env
    hf = server.engine.loaded.tokenizer.tok
    kept = hf.chat_template
    hf.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                        "{% endif %}{{ m['content'] }}{% endfor %}{{ messages[1]['content'] }}")
    try:
        for messages, why in (([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
                              ([{"role": "user", "content": "a"}], "no element 1")):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="base", messages=messages, max_tokens=1)
            assert info.value.body["param"] == "messages" and why in info.value.body["message"]
    finally:
        hf.chat_template = kept


def test_n_with_a_seed_gives_different_reproducible_samples_and_usage_counts_the_prompt_once(env):
    _, client, _, tok = env
    ask = dict(model="base", prompt="once upon", max_tokens=6, temperature=1.0, seed=7, n=3, extra_body=NO_EOS)
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1 and texts == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    alone = client.completions.create(**{**ask, "n": 1})
    assert alone.choices[0].text == texts[0]  # choice i is sampled with seed + i
    prompt_len = len(_encode(tok, "once upon"))
    assert first.usage.prompt_tokens == prompt_len and first.usage.completion_tokens == 18
    two = client.completions.create(model="base", prompt=["ab", "abcd"], n=2, max_tokens=3, temperature=0, extra_body=NO_EOS)
    assert two.usage.prompt_tokens == 3 + 5 and two.usage.completion_tokens == 12 and len(two.choices) == 4


def test_stream_options_include_usage(env):
    _, client, _, tok = env
    chunks = list(client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hey"}], max_tokens=4,
                                                 temperature=0, n=2, stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == len(_chat_ids(tok, [{"role": "user", "content": "hey"}]))
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.completions.create(model="base", prompt="hey", max_tokens=2, temperature=0, stream=True, extra_body=NO_EOS))
    assert all(c.usage is None and c.choices for c in plain)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="hey", max_tokens=2, stream_options={"include_usage": True})


def test_models_by_id(env):
    _, client, _, _ = env
    assert client.models.retrieve("base").id == "base"
    assert client.models.retrieve("broken").parent == "base"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found" and "'nope' does not exist" in info.value.body["message"]


def test_penalties_and_logit_bias_change_the_logits_as_openai_defines(env):
    _, client, model, tok = env
    prompt = _encode(tok, "abc")
    plain = client.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0, extra_body=NO_EOS)
    ask = dict(model="base", prompt=prompt, max_tokens=8, temperature=0, presence_penalty=1.5, frequency_penalty=2.0,
               logit_bias={"7": 3.5, str(plain.choices[0].token_ids[0]): -100}, logprobs=2, extra_body=NO_EOS)
    got = client.completions.create(**ask)
    want, lps = _greedy_reference(model, prompt, 8, {7: 3.5, plain.choices[0].token_ids[0]: -100}, 1.5, 2.0)
    assert got.choices[0].token_ids == want != plain.choices[0].token_ids
    assert got.choices[0].logprobs.token_logprobs == pytest.approx([float(lp[t]) for lp, t in zip(lps, want)], abs=1e-4)
    forced = client.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0, logit_bias={"300": 100},
                                       extra_body=NO_EOS)
    assert forced.choices[0].token_ids == [300] * 4
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": "1"}, {"logit_bias": {"x": 1}}, {"logit_bias": {"512": 1}},
                {"logit_bias": {"5": 101}}, {"logit_bias": {str(i): 1 for i in range(301)}}, {"logit_bias": [1]}):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="base", prompt="a", max_tokens=1, extra_body=bad)
        assert info.value.body["param"] == next(iter(bad)), bad


def test_fields_that_would_change_the_answer_are_refused_not_ignored(env):
    """JSON mode, functions and vLLM's sampling extensions are not implemented: asking for them is a 400 naming the
    field (ignored, a client asking for JSON or top_k got free text without knowing); their defaults pass."""
    _, client, _, _ = env
    messages = [{"role": "user", "content": "hi"}]
    for bad in ({"response_format": {"type": "json_object"}}, {"top_k": 1}, {"min_p": 0.5}, {"repetition_penalty": 1.3},
                {"min_tokens": 4}, {"stop_token_ids": [5]}, {"include_stop_str_in_output": True}, {"guided_json": {}},
                {"tool_choice": "required"}, {"functions": [{"name": "f"}]}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="base", messages=messages, max_tokens=1, extra_body=bad)
        assert info.value.body["param"] == next(iter(bad)), bad
    defaults = {"response_format": {"type": "text"}, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 0,
                "stop_token_ids": [], "tool_choice": "none"}
    assert client.chat.completions.create(model="base", messages=messages, max_tokens=1, extra_body=defaults).choices


def test_max_tokens_defaults(env):
    _, client, _, tok = env
    messages = [{"role": "user", "content": "go on"}]
    chat = client.chat.completions.create(model="base", messages=messages, temperature=0, extra_body=NO_EOS)
    assert chat.usage.completion_tokens == 128 - len(_chat_ids(tok, messages)) and chat.choices[0].finish_reason == "length"
    plain = client.completions.create(model="base", prompt="go", temperature=0, extra_body=NO_EOS)
    assert plain.usage.completion_tokens == 16  # legacy completions: OpenAI's default of 16
    capped = client.chat.completions.create(model="base", messages=messages, temperature=0, max_completion_tokens=3, extra_body=NO_EOS)
    assert capped.usage.completion_tokens == 3


def test_logprobs_equal_transformers_log_softmax(env):
    _, client, model, tok = env
    prompt = _encode(tok, "xyz")
    want, lps = _greedy_reference(model, prompt, 6)
    got = client.completions.create(model="base", prompt="xyz", max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS)
    lp = got.choices[0].logprobs
    pieces = [_piece(tok, t) for t in want]
    assert lp.tokens == pieces and lp.text_offset == [len("".join(pieces[:i])) for i in range(6)]
    assert lp.token_logprobs == pytest.approx([float(s[t]) for s, t in zip(lps, want)], abs=1e-4)
    for top, s in zip(lp.top_logprobs, lps):
        values, ids = s.topk(3)
        assert top == pytest.approx({_piece(tok, i): v for i, v in zip(ids.tolist(), values.tolist())}, abs=1e-4)
    streamed = list(client.completions.create(model="base", prompt="xyz", max_tokens=6, temperature=0, logprobs=3, stream=True,
                                              extra_body=NO_EOS))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    messages = [{"role": "user", "content": "xyz"}]
    cwant, clps = _greedy_reference(model, _chat_ids(tok, messages), 4)
    chat = client.chat.completions.create(model="base", messages=messages, max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=2,
                                          extra_body=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == [_piece(tok, t) for t in cwant]
    assert [c.logprob for c in content] == pytest.approx([float(s[t]) for s, t in zip(clps, cwant)], abs=1e-4)
    assert [[e.token for e in c.top_logprobs] for c in content] == [[_piece(tok, i) for i in s.topk(2).indices.tolist()] for s in clps]
    cstream = list(client.chat.completions.create(model="base", messages=messages, max_tokens=4, temperature=0, logprobs=True,
                                                  stream=True, extra_body=NO_EOS))
    assert [e.logprob for c in cstream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] == \
        [c.logprob for c in content]
    sampled = client.chat.completions.create(model="base", messages=messages, max_tokens=1, temperature=2.0, seed=3, logprobs=True,
                                             extra_body=NO_EOS)
    first = sampled.choices[0].logprobs.content[0].logprob  # before temperature: the model's own distribution
    assert first == pytest.approx(float(clps[0][sampled.choices[0].token_ids[0]]), abs=1e-4)
    for bad in ({"logprobs": 6}, {"logprobs": True}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="base", prompt="a", max_tokens=1, extra_body=bad)
    for bad in ({"logprobs": True, "top_logprobs": 21}, {"top_logprobs": 2}, {"logprobs": 1}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="base", messages=messages, max_tokens=1, extra_body=bad)


def test_errors_before_the_first_token_are_http_errors_after_it_error_events(env):
    server, client, _, _ = env
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            list(client.completions.create(model="broken", prompt="a", max_tokens=2, stream=stream))
        assert info.value.status_code == 422 and info.value.body["type"] == "invalid_request_error"
    engine, forward = server.engine, server.engine.forward

    def failing(ids, mask, positions, kv):
        if kv is not None:  # a decode step: the first token (from the prefill) is out
            raise RuntimeError("device lost")
        return forward(ids, mask, positions, kv)

    engine.forward = failing
    try:
        stream = client.completions.create(model="base", prompt="a", max_tokens=5, temperature=0, stream=True, extra_body=NO_EOS)
        with pytest.raises(openai.APIError) as info:
            for _ in stream:
                pass
        assert "device lost" in info.value.message
    finally:
        engine.forward = forward
    deadline = time.monotonic() + 10
    while server.engine.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.completions.create(model="base", prompt="a", max_tokens=2, temperature=0).usage.completion_tokens >= 1


@pytest.mark.parametrize("text, stops, sent, stopped", [
    ("xabdz", ["abc", "bd"], "xa", True),  # the earliest stop wins; "a" was held (it could start "abc") until "d" ruled it out
    ("xab", ["abc"], "xab", False),  # held to the end, then given out
    ("caf\u00e9!", ["\u00e9!"], "caf", True),  # a stop after a two-byte character, itself fed byte by byte
    ("aaab", ["aab"], "a", True),  # overlapping beginnings
])
def test_stop_text_holds_back_what_could_be_a_stop(text, stops, sent, stopped):
    from fmhub.serving.model import ByteTokenizer
    from fmhub.serving.stops import StopText

    st, out, seen = StopText(ByteTokenizer(None), stops), "", []
    for b in text.encode():
        out += st.push(b)
        seen.append(out)
        if st.stopped:
            break
    out += st.flush()
    assert out == sent and st.stopped == stopped
    assert all(sent.startswith(so_far) for so_far in seen)  # nothing handed out was taken back


def test_stop_text_decodes_each_token_a_bounded_number_of_times():
    """A long completion costs the same per token as a short one: no re-decoding of everything so far."""
    from fmhub.serving.model import ByteTokenizer
    from fmhub.serving.stops import StopText

    class Counting(ByteTokenizer):
        decoded = 0

        def decode(self, ids, *a, **kw):
            Counting.decoded += len(ids)
            return super().decode(ids, *a, **kw)

    text = ("caf\u00e9 {x} " * 400).encode()
    st_ = StopText(Counting(None), ["{i", "\u00e9!"])
    out = "".join(st_.push(b) for b in text) + st_.flush()
    assert out == text.decode() and not st_.stopped
    assert Counting.decoded < 8 * len(text)  # whole-text decoding each time would be ~len(text)² / 2 = 8e6


def test_a_tokenizer_that_cleans_up_spaces_loses_no_text(tmp_path):
    """GPT-2's and Llama 3's tokenizers clean up spaces (" ." to "."), which reaches back into text already decoded:
    the decoding stalled at "x " for good, and the rest of the completion was lost (vLLM does not clean up either)."""
    from transformers import AutoTokenizer

    from fmhub.serving.model import HFTokenizer
    from fmhub.serving.stops import StopText

    _char_tokenizer(tmp_path)
    tok = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path, clean_up_tokenization_spaces=True))
    for stops in ([], ["cd!"]):
        st_ = StopText(tok, stops)
        out = "".join(st_.push(t) for t in tok.encode("x .ab , cd")[1:])
        assert out + st_.flush() == "x .ab , cd"


def test_stop_text_costs_the_same_per_token_with_long_stop_strings():
    """Four stops of 512 characters that never match cost about what one short stop does per token (they held the GIL
    ~60x longer: each beginning of each stop tested against the text), so no client slows the engine thread with them."""
    from fmhub.serving.model import ByteTokenizer
    from fmhub.serving.stops import MAX_STOP_CHARS, StopText

    def per_token(stops):
        best = float("inf")
        for _ in range(3):
            st_, start = StopText(ByteTokenizer(None), stops), time.perf_counter()
            for i in range(1500):
                st_.push(ord("ab"[i % 3 == 0]))
            best = min(best, time.perf_counter() - start)
        return best

    hostile = ["ba" * (MAX_STOP_CHARS // 2), "x" * MAX_STOP_CHARS, "ab" * (MAX_STOP_CHARS // 2 - 1) + "c", "a" * MAX_STOP_CHARS]
    assert per_token(hostile) < 8 * per_token(["\n\n"])


_anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)}),
                  st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "file", "text"]), "image_url": _anything}))
_new_fields = {
    "logit_bias": st.one_of(st.dictionaries(st.sampled_from(["0", "5", "511", "512", "-1", "x", "07"]),
                                            st.one_of(st.floats(-120, 120), _anything), max_size=4), _anything),
    "presence_penalty": st.one_of(st.floats(-3, 3), _anything), "frequency_penalty": st.one_of(st.floats(-3, 3), _anything),
    "logprobs": st.one_of(st.integers(-1, 7), st.booleans(), _anything), "top_logprobs": st.one_of(st.integers(-1, 22), _anything),
    "stream": st.booleans(), "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _anything),
    "stop": st.one_of(st.text(min_size=1, max_size=3), _anything), "n": st.integers(1, 3), "temperature": st.floats(0, 2),
    "seed": st.integers(0, 9), "max_tokens": st.integers(1, 3), "max_completion_tokens": st.integers(1, 3),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.fixed_dictionaries({"model": st.just("base"), "messages": st.lists(st.fixed_dictionaries(
    {"role": st.just("user"), "content": st.one_of(st.text(max_size=8), st.lists(_part, max_size=3), _anything)}), min_size=1, max_size=2)},
    optional=_new_fields), chat=st.booleans())
def test_fuzzed_openai_options_get_an_answer_or_a_400(env, body, chat):
    """Whatever these options hold, the answer is a 200 in OpenAI's shape or a 400 naming the field: never a 500."""
    server = env[0]
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not chat:
        body = {**{k: v for k, v in body.items() if k != "messages"}, "prompt": "ab"}
    status, doc = http("POST", server.url + path, {**body, "ignore_eos": True})
    assert status in (200, 400), (status, doc)
    if status == 400:
        assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"]
    elif isinstance(doc, dict):
        assert doc["choices"] and doc["usage"]["completion_tokens"] >= 1
    else:
        assert doc.rstrip().endswith("data: [DONE]") and '"error"' not in doc, doc[-300:]
