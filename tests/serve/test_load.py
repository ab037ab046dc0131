"""`dsv4 serve` under load and faults: concurrent streams against the one-request-alone run,
clients that disconnect, a full waiting queue, SIGTERM, and an engine loop that dies.
Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import httpx
import pytest

from tests.serve_util import metric, server_process, sse_events
from v4.engine import LLM, SamplingParams
from v4.runtime import load


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def wait_idle(url: str, timeout: float = 30) -> str:
    """Poll /metrics until nothing runs and the cache is empty again; returns the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        if metric(text, "vllm:num_requests_running") == 0 and metric(text, "vllm:kv_cache_usage_perc") == 0:
            return text
        assert time.monotonic() < deadline, "the server did not free its requests in time:\n" + text
        time.sleep(0.1)


@pytest.fixture(scope="module")
def busy_server():
    """Small step budget (prompts are chunked among decodes) and a KV budget small enough that
    the 32 clients cannot all hold their blocks at once."""
    with server_process("--config", "tiny", "--dtype", "float64", "--max-num-seqs", "8",
                        "--max-num-batched-tokens", "48", "--kv-cache-memory", "6MiB") as srv:
        yield srv


def test_32_concurrent_streams_equal_each_request_alone(busy_server):
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "window", "cache", "token", "ascend", "kernel", "stream"]
    requests = []
    for i in range(32):
        prompt = " ".join(
            rng.choice(words) for _ in range(rng.randint(1, 30))
        )  # 5 .. ~200 tokens: window and compressor boundaries
        requests.append((prompt, rng.randint(4, 40)))

    async def one(client, prompt, n):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", busy_server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        events = sse_events(lines)
        assert events[-1] == "[DONE]"
        chunks, usage = events[:-2], events[-2]
        assert len({c["id"] for c in chunks}) == 1
        return "".join(c["choices"][0]["text"] for c in chunks), usage["usage"]

    async def everyone():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p, n) for p, n in requests)), 300)

    got = asyncio.run(everyone())
    L = load(config="tiny", overrides={"dtype": "float64"}, progress=False)
    alone = LLM(L.model, L.runtime, L.tokenizer)
    for (prompt, n), (text, usage) in zip(requests, got):
        ids = L.tokenizer.encode(prompt)
        want = alone.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert text == want.text, prompt
        assert usage == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
    wait_idle(busy_server.url)


def test_disconnected_clients_free_their_blocks(busy_server):
    before = httpx.get(busy_server.url + "/metrics").text
    body = {"prompt": "never mind", "max_tokens": 900, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", busy_server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]  # three events and their blank lines: the request is running
    assert sum(line.startswith("data: ") for line in seen) == 3
    # a non-streamed request whose client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            busy_server.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(60, read=1.0)
        )
    after = wait_idle(busy_server.url)
    aborted = 'vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"}'
    was = next((float(x.rsplit(" ", 1)[1]) for x in before.splitlines() if x.startswith(aborted)), 0.0)
    now = next(float(x.rsplit(" ", 1)[1]) for x in after.splitlines() if x.startswith(aborted))
    assert now - was == 2
    ok = httpx.post(busy_server.url + "/v1/completions", json={"prompt": "next", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200


def test_full_waiting_queue_gets_503_then_serves_again():
    with server_process("--config", "tiny", "--dtype", "float64", "--max-num-seqs", "1", "--max-waiting", "1") as srv:
        long = {"prompt": "hold", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60) as running:
            lines = running.iter_lines()  # (keep the iterator: dropping it closes the response)
            next(lines)  # the first token is out: it holds the only slot
            with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=60) as waiting:
                assert waiting.status_code == 200  # accepted: it waits for the slot
                r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60)
                assert r.status_code == 503
                err = r.json()["error"]
                assert err["code"] == 503 and "--max-waiting" in err["message"]
        wait_idle(srv.url)
        assert (
            httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60).status_code
            == 200
        )


def test_sigterm_finishes_short_requests_aborts_long_ones_and_exits_0():
    with server_process("--config", "tiny", "--dtype", "float64", "--max-model-len", "8192",
                        "--shutdown-timeout", "3") as srv:
        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                async def stream(n):
                    body = {"prompt": "bye", "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
                    lines = []
                    try:
                        async with client.stream("POST", srv.url + "/v1/completions", json=body) as r:
                            async for line in r.aiter_lines():
                                lines.append(line)
                    except httpx.HTTPError:
                        pass  # the long one may be cut off when the grace period ends
                    return sse_events(lines)

                long = asyncio.create_task(stream(8000))
                short = asyncio.create_task(stream(40))
                await asyncio.sleep(0.5)
                srv.proc.send_signal(signal.SIGTERM)
                return await asyncio.wait_for(asyncio.gather(short, long), 60)

        short, long = asyncio.run(run())
        assert srv.proc.wait(30) == 0
        assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
        finished = [e for e in long if e != "[DONE]" and e.get("choices") and e["choices"][0]["finish_reason"]]
        assert not any(e["choices"][0]["finish_reason"] == "length" for e in finished)  # it did not run to the end
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=5)
