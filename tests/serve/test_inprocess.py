"""The server with a hand on the engine: a real uvicorn server on 127.0.0.1 on a thread of this
process, so a test can choose what the model says (a scripted sampler, to read reasoning and DSML
tool calls back through the API) or make the engine loop die. Expected values are hand-written."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.serve_util import server_in_thread, server_process, sse_events
from v4.engine import LLM
from v4.engine.sampler import Sampler
from v4.runtime import load
from v4.serve.app import build_app
from v4.serve.async_engine import AsyncEngine
from v4.serve.metrics import ServerMetrics
from v4.serve.openai_serving import ServerContext

D = "｜DSML｜"
ANSWER = (f'Let me think.</think>I\'ll check the weather.\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
          f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
          f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
          f'<{D}invoke name="get_time">\n<{D}parameter name="zone" string="true">CET</{D}parameter>\n</{D}invoke>\n'
          f'</{D}tool_calls>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedSampler(Sampler):
    """Every request 'samples' the same script, one byte token at a time, then EOS."""

    def __init__(self, eos: int, script: list[int]):
        super().__init__(eos)
        self.script = script + [eos]

    def __call__(self, logits, seqs):
        return [self.script[min(len(s.output_ids), len(self.script) - 1)] for s in seqs], [None] * len(seqs)


@pytest.fixture(scope="module")
def tiny():
    return load(config="tiny", progress=False)


def app_for(llm: LLM):
    metrics = ServerMetrics("tiny")
    engine = AsyncEngine(llm, max_waiting=8, on_step=metrics.on_step)
    ctx = ServerContext(engine, llm.tokenizer, "tiny", llm.model.cfg.vocab_size, llm.runtime.max_model_len, metrics)
    return build_app(ctx)


@pytest.fixture(scope="module")
def scripted(tiny):
    # the tools section alone is over 1000 byte tokens
    llm = LLM(tiny.model, dataclasses.replace(tiny.runtime, max_model_len=4096), tiny.tokenizer)
    llm.sampler = ScriptedSampler(tiny.cfg.eos_token_id, tiny.tokenizer.encode(ANSWER, add_bos=False))
    with server_in_thread(app_for(llm)) as url:
        yield url


def chat(url, **body):
    return httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 1000, **body}, timeout=60)


def test_reasoning_and_tool_calls_parse(scripted):
    r = chat(scripted, tools=TOOLS).json()
    choice = r["choices"][0]
    msg = choice["message"]
    assert msg["reasoning"] == msg["reasoning_content"] == "Let me think."
    assert msg["content"] == "I'll check the weather."
    calls = [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
    assert calls == [
        ("function", "get_weather", {"city": "Paris", "days": 3}),
        ("function", "get_time", {"zone": "CET"}),
    ]
    assert len({c["id"] for c in msg["tool_calls"]}) == 2
    assert choice["finish_reason"] == "tool_calls"


def test_streamed_reasoning_and_tool_calls_leak_no_markup(scripted):
    with httpx.stream("POST", scripted + "/v1/chat/completions", timeout=60,
                      json={"messages": USER, "max_tokens": 1000, "tools": TOOLS, "stream": True}) as r:
        events = sse_events(r.read().decode().split("\n\n"))
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    reasoning = "".join(d.get("reasoning", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning == "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think."
    assert content == "I'll check the weather."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(0, "get_weather", {"city": "Paris", "days": 3}), (1, "get_time", {"zone": "CET"})]
    assert not any("｜" in (d.get("content") or "") + d.get("reasoning", "") for d in deltas)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "tool_calls"


def test_openai_client_reads_tool_calls(scripted):
    client = openai.OpenAI(base_url=scripted + "/v1", api_key="none", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=1000)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    names = [c.function.name for part in client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS,
                                                                          max_tokens=1000, stream=True)
             for c in (part.choices[0].delta.tool_calls or []) if part.choices]
    assert names == ["get_weather", "get_time"]


@pytest.mark.parametrize("tools", [None, "none"])
def test_without_tools_the_markup_is_dropped_not_leaked(scripted, tools):
    body = {"tools": TOOLS, "tool_choice": "none"} if tools == "none" else {}
    choice = chat(scripted, **body).json()["choices"][0]
    assert choice["message"]["content"] == "I'll check the weather." and choice["message"]["tool_calls"] == []
    assert choice["finish_reason"] == "stop"


def test_completions_endpoint_returns_the_raw_text(scripted):
    r = httpx.post(scripted + "/v1/completions", json={"prompt": "x", "max_tokens": 1000}, timeout=60).json()
    assert r["choices"][0]["text"] == ANSWER and r["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------- a dying engine
def test_engine_death_is_reported_and_health_turns_503(tiny):
    llm = LLM(tiny.model, tiny.runtime, tiny.tokenizer)
    real_step, state = llm.step, {"steps": 0}

    def failing_step():
        state["steps"] += 1
        if state["steps"] > 3:
            raise RuntimeError("injected fault")
        return real_step()

    llm.step = failing_step
    with server_in_thread(app_for(llm)) as url:
        assert httpx.get(url + "/health").status_code == 200
        body = {"prompt": "x", "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            events = sse_events(r.read().decode().split("\n\n"))
        assert events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["code"] == 503 and "injected fault" in err["message"]
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and "restart the server" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- a Jinja checkpoint
def test_checkpoint_with_a_jinja_template_uses_it(tmp_path):
    ckpt = tmp_path / "tiny-ckpt"
    subprocess.run([sys.executable, "-m", "v4.cli", "init", "--config", "tiny", "--out", str(ckpt), "--quant", "fp32"],
                   check=True, capture_output=True, timeout=120)
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    with server_process("--checkpoint", str(ckpt), "--served-model-name", "t") as srv:
        r = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, timeout=60).json()
        assert r["tokens"] == [b + 3 for b in "<s>[user]Hi[assistant]".encode()]
        out = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                         json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
        assert (
            out["usage"]["prompt_tokens"] == len(r["tokens"]) and out["choices"][0]["message"].get("reasoning") is None
        )


def test_the_thread_that_built_the_model_runs_its_steps():
    # torch work must stay on one thread (EngineThread's docstring: a second OpenMP team made decode
    # ~25% slower): the engine loop runs on the worker that built the model, never on the caller's
    import asyncio
    import threading

    from v4.engine import SamplingParams
    from v4.serve.async_engine import EngineThread

    worker = EngineThread()
    built_on = {}

    def build():
        built_on["thread"] = threading.get_ident()
        L = load(config="tiny", progress=False)
        return LLM(L.model, L.runtime)

    llm = worker.submit(build).result()
    stepped_on = set()
    step = llm.step
    llm.step = lambda: stepped_on.add(threading.get_ident()) or step()

    async def one_request():
        engine = AsyncEngine(llm, worker=worker)
        engine.start(asyncio.get_running_loop())
        stream = await engine.add([0, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
        outs = [o async for o in stream]
        engine.shutdown(5.0)
        return outs

    outs = asyncio.run(one_request())
    assert sum(len(o.new_token_ids) for o in outs) == 3 and outs[-1].finished
    assert stepped_on == {built_on["thread"]} and built_on["thread"] != threading.get_ident()
    failed = worker.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(5.0)
    assert worker.submit(lambda: threading.get_ident()).result(5.0) == built_on["thread"]  # the worker lives on
