"""`dsv4 serve` end to end: a real server process on 127.0.0.1, real clients (the `openai` package
and httpx). Expected values come from the engine run in this process, one request alone, on the
same seeded `tiny` weights in float64 (so near-ties cannot flip a greedy token), from the chat
format's rules written out by hand, and from the byte tokenizer's formula (id = byte + 3)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from tests.serve_util import metric, server_process, sse_events
from v4.engine import LLM, SamplingParams
from v4.runtime import load

BOS = "<｜begin▁of▁sentence｜>"


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def server():
    with server_process("--config", "tiny", "--dtype", "float64", "--served-model-name", "dsv4-tiny") as srv:
        yield srv


@pytest.fixture(scope="module")
def ref():
    """The same model, in this process: each request served alone."""
    L = load(config="tiny", overrides={"dtype": "float64"}, progress=False)
    llm = LLM(L.model, L.runtime, L.tokenizer)

    def run(ids, **kw):
        return llm.generate([ids], SamplingParams(**kw))[0]

    run.tokenizer = L.tokenizer
    return run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=60, **kw)


def stream_events(server, path, body) -> list:
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(part.startswith("data: ") for part in raw.split("\n\n") if part)
    return sse_events(raw.split("\n\n"))


# ---------------------------------------------------------------------------- completions
def test_completion_matches_the_engine_alone(client, ref):
    want = ref([0, *byte_ids("Hello world")], max_tokens=12, temperature=0, ignore_eos=True)
    r = client.completions.create(model="dsv4-tiny", prompt="Hello world", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "dsv4-tiny"
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 12, 24)


def test_token_id_prompt_and_add_special_tokens(server, ref):
    ids = [0, *byte_ids("Hello world")]
    by_ids = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0}).json()
    by_text = post(server, "/v1/completions", {"prompt": "Hello world", "max_tokens": 6, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    no_bos = post(server, "/v1/completions", {"prompt": "Hello world", "max_tokens": 6, "temperature": 0,
                                              "add_special_tokens": False}).json()
    assert no_bos["usage"]["prompt_tokens"] == 11
    assert no_bos["choices"][0]["text"] == ref(byte_ids("Hello world"), max_tokens=6, temperature=0).text


def test_echo_prepends_the_prompt(server, ref):
    want = ref([0, *byte_ids("abc")], max_tokens=5, temperature=0)
    r = post(server, "/v1/completions", {"prompt": "abc", "max_tokens": 5, "temperature": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "abc" + want.text


def test_completion_logprobs_equal_the_engines(server, ref):
    want = ref([0, *byte_ids("log")], max_tokens=4, temperature=0, logprobs=3)
    r = post(server, "/v1/completions", {"prompt": "log", "max_tokens": 4, "temperature": 0, "logprobs": 3}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx([x.logprob for x in want.logprobs], abs=1e-9)
    tok = ref.tokenizer
    assert lp["tokens"] == [tok.decode([x.token_id]) for x in want.logprobs]
    assert all(len(top) <= 3 for top in lp["top_logprobs"])
    # text_offset: where each token's text starts, counted from the start of the completion
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]


def test_stop_token_ids_and_min_tokens(server, ref):
    ids = [0, *byte_ids("stop here")]
    free = ref(ids, max_tokens=10, temperature=0, ignore_eos=True)
    third = free.output_ids[2]
    first_at = free.output_ids.index(third)  # the output may hold that id earlier
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0,
                                         "stop_token_ids": [third], "ignore_eos": True}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == first_at + 1
    r = post(server, "/v1/completions", {"prompt": ids, "max_tokens": 10, "temperature": 0, "stop_token_ids": [third],
                                         "ignore_eos": True, "min_tokens": 10}).json()
    assert r["usage"]["completion_tokens"] == 10 and r["choices"][0]["finish_reason"] == "length"


def test_stop_string_is_cut_and_not_emitted(server, ref):
    ids = [0, *byte_ids("strings")]
    free = ref(ids, max_tokens=16, temperature=0, ignore_eos=True).text
    k = next(i for i in range(1, len(free) - 1) if free[i].isprintable() and free[i] != "\ufffd")
    stop = free[k]
    body = {"prompt": ids, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    r = post(server, "/v1/completions", body).json()
    assert r["choices"][0]["text"] == free[:free.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    streamed = stream_events(server, "/v1/completions", {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == free[:free.index(stop)]


def test_seeded_sampling_repeats(server):
    body = {"prompt": "seed", "max_tokens": 8, "temperature": 1.0, "top_k": 50, "min_p": 0.01, "seed": 1234}
    a, b = (post(server, "/v1/completions", body).json()["choices"][0]["text"] for _ in range(2))
    assert a == b


def test_streamed_completion_equals_non_streamed(server):
    body = {"prompt": "Stream me", "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    whole = post(server, "/v1/completions", body).json()
    events = stream_events(
        server, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in chunks + [usage]}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    no_usage = stream_events(server, "/v1/completions", {**body, "stream": True})
    assert all(e == "[DONE]" or e["choices"] for e in no_usage)


def test_openai_client_streams(client):
    parts = list(client.completions.create(model="dsv4-tiny", prompt="abc", max_tokens=5, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert parts[-1].usage.completion_tokens == 5 and parts[-1].choices == []
    assert parts[-2].choices[0].finish_reason in ("length", "stop")


# ---------------------------------------------------------------------------- chat
def test_chat_prompt_is_v4_format(server):
    """Thinking mode (the default): BOS, the system text as it is, <｜User｜>, <｜Assistant｜><think>."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = BOS + "Be brief.<｜User｜>Hi<｜Assistant｜><think>"
    r = post(server, "/tokenize", {"messages": messages}).json()
    assert r["tokens"] == [0, *byte_ids(text[len(BOS):])] and r["count"] == len(r["tokens"])
    chat_mode = post(server, "/tokenize", {"messages": messages, "chat_template_kwargs": {"thinking": False}}).json()
    assert chat_mode["tokens"] == [0, *byte_ids("Be brief.<｜User｜>Hi<｜Assistant｜></think>")]
    done = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0}).json()
    assert done["usage"]["prompt_tokens"] == len(r["tokens"])


def test_chat_thinking_mode_answers_in_reasoning(client, ref):
    """The tiny model never writes </think>: everything it says is reasoning, under both names."""
    prompt = [0, *byte_ids("<｜User｜>Hi<｜Assistant｜><think>")]
    want = ref(prompt, max_tokens=6, temperature=0, ignore_eos=True).text
    r = client.chat.completions.create(model="dsv4-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True})
    msg = r.model_dump()["choices"][0]["message"]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert msg["reasoning"] == msg["reasoning_content"] == want.replace("</think>", "")
    assert msg["content"] == "" and r.choices[0].finish_reason == "length"


def test_chat_mode_answers_in_content(client, ref):
    prompt = [0, *byte_ids("<｜User｜>Hi<｜Assistant｜></think>")]
    want = ref(prompt, max_tokens=6, temperature=0, ignore_eos=True).text
    r = client.chat.completions.create(model="dsv4-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                       temperature=0, extra_body={"ignore_eos": True,
                                                                  "chat_template_kwargs": {"thinking": False}})
    msg = r.model_dump()["choices"][0]["message"]
    assert msg["content"] == want
    assert msg.get("reasoning") is None and msg.get("reasoning_content") is None


def test_chat_stream_shape(server):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2,
            "ignore_eos": True}
    events = stream_events(server, "/v1/chat/completions", body)
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    n_logprobs = sum(len((c["choices"][0]["logprobs"] or {}).get("content", [])) for c in chunks)
    assert n_logprobs == 5
    whole = post(server, "/v1/chat/completions", {**body, "stream": False, "stream_options": None}).json()
    streamed = "".join(c["choices"][0]["delta"].get("reasoning", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["reasoning"]


# ---------------------------------------------------------------------------- the other endpoints
def test_models_health_version_detokenize(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["dsv4-tiny"]
    assert models.data[0].model_dump()["max_model_len"] == 1024
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    assert post(server, "/detokenize", {"tokens": byte_ids("héllo")}).json() == {"prompt": "héllo"}
    r = post(server, "/tokenize", {"prompt": "hé", "return_token_strs": True}).json()
    assert r["tokens"] == [0, *byte_ids("hé")] and r["max_model_len"] == 1024 and len(r["token_strs"]) == 4


def test_metrics_carry_vllms_names(server):
    before = httpx.get(server.url + "/metrics").text
    post(server, "/v1/completions", {"prompt": "count", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count"):
        assert re.search(rf'^{re.escape(name)}{{engine="0",model_name="dsv4-tiny"}} ', text, re.M), name
    assert metric(text, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 4
    assert metric(text, "vllm:prompt_tokens_total") - metric(before, "vllm:prompt_tokens_total") == 6
    assert metric(text, "vllm:inter_token_latency_seconds_count") - \
        metric(before, "vllm:inter_token_latency_seconds_count") == 3
    assert metric(text, "vllm:kv_cache_usage_perc") == 0.0 and metric(text, "vllm:num_requests_running") == 0


# ---------------------------------------------------------------------------- errors
BAD = [
    ("invalid JSON", "/v1/completions", b"{bad", 400, None),
    ("wrong type", "/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("temperature < 0", "/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p = 0", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("top_p > 1", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, 400, "top_p"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty ids", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, None),
    ("too long", "/v1/completions", {"prompt": "x" * 1030, "max_tokens": 1}, 400, "max_tokens"),
    ("max_tokens over context", "/v1/completions", {"prompt": "x", "max_tokens": 1024}, 400, "max_tokens"),
    ("ids outside the vocabulary", "/v1/completions", {"prompt": [5, 512]}, 400, "prompt"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model"),
    ("n = 2", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ("top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("required tool_choice", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400, "tool_choice"),
    ("oversized body", "/v1/completions", {"prompt": "x" * (33 * 2**20)}, 413, None),
]


@pytest.mark.parametrize("what,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_envelope_and_the_server_goes_on(server, what, path, body, status, param):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(server.url + path, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert err["message"] and err["param"] == param
    if what in ("too long", "max_tokens over context"):
        assert err["message"].startswith("This model's maximum context length is 1024 tokens")
    ok = post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv4-tiny", prompt="x", max_tokens=1, temperature=-1)
    assert json.loads(e.value.response.text)["error"]["param"] == "temperature"
