"""Serving benchmark: `dsv4 serve` against `transformers serve` on the same weights, client side.

What it measures, per server, the way `vllm bench serve` defines it (spec/serving.md §1.7): a fixed
set of random-text prompts is sent as streaming `POST /v1/completions` requests (prompt as a string,
temperature 0, exactly --output-len tokens forced), at most --max-concurrency in flight, arriving all
at t=0 (--request-rate inf) or as a seeded Poisson process. For each request the client stamps
  TTFT  send -> first streamed chunk with text,     E2EL  send -> end of the stream,
  TPOT  (E2EL - TTFT) / (output tokens - 1),         ITL   every gap between streamed text chunks,
and over the run: duration (first send to last completion), completed / failed, request
throughput, output tok/s, total tok/s, goodput (requests meeting every --goodput SLO per second),
and mean / percentiles of TTFT, TPOT, ITL, E2EL. Output tokens come from the stream's `usage`
(`stream_options.include_usage`) where the server sends it, else from the number of text chunks;
the table says which.

How: the bench starts each server itself on 127.0.0.1 (a free port, `OMP_NUM_THREADS` = --server-threads
for a fair split of the cores), polls /health and /v1/models until it is ready (bounded), sends one
warm-up request, runs the load, then stops it (SIGTERM, then kill). The servers run one after the
other, never together. Both read one HF-format checkpoint: transformers' DeepseekV4ForCausalLM for
our config (`configs/small.yaml` by default), seeded random weights (tests/hf_oracle.py), built once
and cached under /tmp/dsv4-bench/<config>-hf, with a byte-level tokenizer.json equal to ours
(id = byte + 3, 0 bos, 1 eos, 2 pad; the ids past 258 decode to short ASCII words so that every
generated id past the bytes streams visible text). A one-line check shows that dsv4's tokenizer and
transformers' AutoTokenizer give the same ids for the first prompt.

  dsv4 serve          python -m v4.cli serve --checkpoint DIR --max-num-seqs C --dtype float32;
                      exact length via `ignore_eos: true`.
  transformers serve  transformers serve DIR --device cpu --dtype float32 (model preloaded and
                      pinned; no --continuous-batching, which rejects V4's layer types, so it runs
                      one request at a time); it refuses `ignore_eos` (422), so the exact length is
                      forced with its `generation_config` field (min_new_tokens = max_new_tokens).
                      Needs `accelerate` (pip install -c constraints-cpu.txt accelerate).

Both servers get the same prompts. --num-prompts-transformers N gives transformers the first N of
them only (it serves one at a time, so its throughput does not depend on N; the default is all).
The ratio printed is dsv4 / transformers output tok/s. Target (issue, reported, not asserted): on
small, 16 concurrent clients, 128 in / 64 out, dsv4 >= 5x transformers.

A chunk is a streamed event with non-empty text, so a token that decodes to no text on its own
(a lone byte >= 0x80: 128 of small's 32768 ids, but 128 of tiny's 512) opens no chunk: TTFT waits
for the first token with text, and ITL then exceeds TPOT. The token counts come from `usage`.

Measured on 2 CPU cores (AVX2), `python bench/serve.py` (small, 32 prompts of 128 tokens, 64 out,
16 clients, all at t=0; about 3.5 min for the whole run), four runs of the final code on 2026-12-04
(the machine's own speed drifts: transformers went 13.8 -> 11.7 -> 13.3):
  dsv4 serve          69.8 / 86.1 / 72.8 / 95.6 output tok/s, TPOT p50 163 / 142 / 161 / 130 ms,
                      TTFT p50 5.0 / 3.6 / 4.4 / 2.6 s
  transformers serve  13.8 / 11.7 / 11.7 / 13.3 output tok/s, TTFT p50 65 / 80 / 80 / 69 s
  ratio 5.05x / 7.37x / 6.25x / 7.21x: the 5x target is met in every run.
  transformers serves one request at a time, so its TTFT is the queue. Before the server built its
  model on the thread that steps it (v4/serve/async_engine.py, EngineThread), four runs gave 4.70x /
  5.02x / 4.94x / 4.58x with TPOT 158-220 ms: two threads each owning an OpenMP team made libgomp
  throttle every parallel region. Every request got exactly 64 tokens.

    python bench/serve.py                                   # both servers, small, 32 prompts
    python bench/serve.py --smoke                           # tiny config, 4 short prompts, < 1 min
    python bench/serve.py --target transformers --num-prompts 8
    python bench/serve.py --request-rate 2 --goodput ttft:2000 tpot:200 --json /tmp/serve.json
    python bench/serve.py --base-url http://127.0.0.1:8000 --model NAME --checkpoint DIR

Ground rules: it only ever talks to 127.0.0.1; every wait is bounded (--ready-timeout,
--request-timeout, --max-seconds; requests still open at --max-seconds are cancelled and counted
failed).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

CACHE = Path("/tmp/dsv4-bench")
HOST = "127.0.0.1"
TARGETS = ("dsv4", "transformers")
TARGET_RATIO = 5.0
TOKENIZER_VERSION = 1  # bump when byte_level_tokenizer changes: cached checkpoints are rebuilt
# --smoke / full defaults for the options left unset
DEFAULTS = {"config": ("tiny", "small"), "num_prompts": (4, 32), "input_len": (16, 128), "output_len": (8, 64),
            "max_concurrency": (4, 16), "max_seconds": (120.0, 1800.0)}
SERVER_ENV = {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------ checkpoint + tokenizer
def byte_chars() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the others for chr(256 + k)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


def filler_words(n: int) -> list[str]:
    """n distinct tokens ' aa', ' ab', ... (byte-level spelling): what the ids past the bytes decode to."""
    space = byte_chars()[ord(" ")]
    words = (
        space + "".join(t) for L in itertools.count(2) for t in itertools.product(string.ascii_lowercase, repeat=L)
    )
    return list(itertools.islice(words, n))


def byte_level_tokenizer(vocab_size: int):
    """Our ByteTokenizer as a `tokenizers` Tokenizer: one token per UTF-8 byte (id byte + 3), BOS prepended
    by the post-processor (transformers applies it; dsv4 encodes without it and prepends BOS itself)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel

    chars = byte_chars()
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{chars[b]: b + 3 for b in range(256)}}
    vocab.update({w: 259 + i for i, w in enumerate(filler_words(vocab_size - 259))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte stays one token
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    tok.add_special_tokens(["<bos>", "<eos>", "<pad>"])
    return tok


def checkpoint_key(config: str, seed: int) -> dict:
    """What the cached checkpoint depends on: the config file, the weight generator, the tokenizer's version."""
    from v4.config import resolve_config_path

    text = resolve_config_path(config).read_bytes() + (ROOT / "tests" / "hf_oracle.py").read_bytes()
    return {
        "config": config,
        "seed": seed,
        "tokenizer": TOKENIZER_VERSION,
        "sha256": hashlib.sha256(text).hexdigest()[:16],
    }


def ensure_checkpoint(config: str, seed: int) -> Path:
    """The HF-format checkpoint of `config` (random weights, fp32) with its tokenizer, built once."""
    out = CACHE / f"{Path(config).stem}-hf"
    key = checkpoint_key(config, seed)
    meta = out / "bench-meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == key:
        return out
    log(f"building the {config} checkpoint (transformers DeepseekV4ForCausalLM, seed {seed}) in {out} ...")
    t0 = time.perf_counter()
    tmp = CACHE / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(config, seed, tmp)
    (tmp / "bench-meta.json").write_text(json.dumps(key))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"  built in {time.perf_counter() - t0:.1f} s")
    return out


def quiet_transformers() -> None:
    """transformers' config warnings (e.g. on the YaRN factor) belong to the servers' logs, not here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def write_checkpoint(config: str, seed: int, out: Path) -> None:
    from tests.hf_oracle import build
    from v4.config import load_config_file

    quiet_transformers()
    cfg, _ = load_config_file(config)
    if (cfg.bos_token_id, cfg.eos_token_id) != (0, 1):
        raise SystemExit(
            f"{config}: the byte-level tokenizer needs bos 0 / eos 1, the config has {cfg.bos_token_id} / "
            f"{cfg.eos_token_id}"
        )
    out.mkdir(parents=True)
    build(cfg, out, seed=seed)  # the returned model is dropped: the weights are on disk
    byte_level_tokenizer(cfg.vocab_size).save(str(out / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
               "pad_token": "<pad>", "model_max_length": cfg.max_position_embeddings}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))


def tokenisation_check(ckpt: Path, prompt: str) -> tuple[bool, str]:
    """dsv4's tokenizer (v4.tokenizer.load_tokenizer) vs transformers' AutoTokenizer on one prompt."""
    from transformers import AutoTokenizer

    from v4.config import load_config_file
    from v4.tokenizer import load_tokenizer

    quiet_transformers()
    cfg, _ = load_config_file(str(ckpt))
    ours = load_tokenizer(cfg, ckpt)
    theirs = AutoTokenizer.from_pretrained(str(ckpt))(prompt)["input_ids"]
    same = ours.encode(prompt) == list(theirs)
    verdict = "agree" if same else "DISAGREE"
    return same, (f"tokenisation check: dsv4 ({ours.name}) and transformers (AutoTokenizer) {verdict} on prompt 0: "
                  f"{len(theirs)} ids, first {list(theirs[:6])}")


# ------------------------------------------------------------------------------------- workload
@dataclass
class Request:
    index: int
    prompt: str
    prompt_len: int  # tokens, BOS included, by the checkpoint's tokenizer
    output_len: int
    arrival: float  # seconds after the start of the run


def token_counter(ckpt: Path | None):
    """Tokens of a prompt as the servers count them (BOS included); byte-level without a tokenizer.json."""
    path = ckpt / "tokenizer.json" if ckpt is not None else None
    if path is None or not path.is_file():
        return lambda text: len(text.encode("utf-8")) + 1
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda text: len(tok.encode(text, add_special_tokens=True).ids)


def random_text(rng: random.Random, n_tokens: int, count) -> str:
    """Random lowercase words, cut so that `count(text)` is n_tokens (exactly, for byte-level)."""
    words = []
    while count(" ".join(words)) < n_tokens and len(words) < 4 * n_tokens + 4:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8))))
    text = " ".join(words)
    for _ in range(64):  # bounded: each pass drops the surplus as characters
        surplus = count(text) - n_tokens
        if surplus <= 0:
            break
        text = text[:-surplus]
    return text


def length(rng: random.Random, mean: int, ratio: float, low: int) -> int:
    if ratio <= 0:
        return max(low, mean)
    return max(low, rng.randint(math.floor(mean * (1 - ratio)), math.ceil(mean * (1 + ratio))))


def arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))


def make_workload(a, count) -> list[Request]:
    rng = random.Random(a.seed)
    ins = [length(rng, a.input_len, a.range_ratio, 2) for _ in range(a.num_prompts)]
    outs = [length(rng, a.output_len, a.range_ratio, 1) for _ in range(a.num_prompts)]
    texts = [random_text(rng, n, count) for n in ins]
    times = arrivals(a.num_prompts, a.request_rate, random.Random(a.seed + 1))
    return [Request(i, t, count(t), o, at) for i, (t, o, at) in enumerate(zip(texts, outs, times))]


# --------------------------------------------------------------------------------------- client
@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    token_source: str = "chunks"  # or "usage"
    requested: int = 0


def request_body(kind: str, model: str, req: Request) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if kind == "transformers":  # it refuses ignore_eos; min_new_tokens holds EOS back instead
        gen = {"max_new_tokens": req.output_len, "min_new_tokens": req.output_len, "do_sample": False,
               "eos_token_id": 1, "pad_token_id": 2}
        body["generation_config"] = json.dumps(gen)
    else:
        body["ignore_eos"] = True
    return body


def read_event(line: str, res: Result, stamps: list[float]) -> bool:
    """One SSE line into res; True at the end of the stream."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    event = json.loads(data)
    if "error" in event:
        raise RuntimeError(f"server error in stream: {str(event['error'])[:200]}")
    if any(c.get("text") for c in event.get("choices") or []):
        stamps.append(time.perf_counter())
    usage = event.get("usage")
    if usage:
        res.output_tokens, res.prompt_tokens, res.token_source = (
            usage["completion_tokens"],
            usage.get("prompt_tokens", 0),
            "usage",
        )
    return False


async def send(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> Result:
    res, stamps = Result(requested=body["max_tokens"]), []
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}")
                async for line in r.aiter_lines():
                    if read_event(line, res, stamps):
                        break
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        res.error = f"{type(e).__name__}: {e}"[:300] if str(e) else type(e).__name__
        return res
    return finish(res, stamps, t0)


def finish(res: Result, stamps: list[float], t0: float) -> Result:
    res.e2el = time.perf_counter() - t0
    if not stamps:
        res.error = "the stream carried no text"
        return res
    res.ttft = stamps[0] - t0
    res.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    if res.token_source == "chunks":
        res.output_tokens = len(stamps)
    res.ok = True
    return res


async def run_load(url: str, kind: str, model: str, reqs: list[Request], a) -> tuple[list[Result], float]:
    """Every request at its arrival time, at most --max-concurrency open; stops at --max-seconds."""
    sem = asyncio.Semaphore(a.max_concurrency)
    limits = httpx.Limits(max_connections=a.max_concurrency + 4, max_keepalive_connections=a.max_concurrency + 4)
    results: list[Result | None] = [None] * len(reqs)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(a.request_timeout), trust_env=False) as client:
        t0 = time.perf_counter()

        async def one(req: Request) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival - time.perf_counter()))
            async with sem:
                results[req.index] = await send(client, url, request_body(kind, model, req), a.request_timeout)

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        _, pending = await asyncio.wait(tasks, timeout=a.max_seconds)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    lost = Result(error=f"cancelled at --max-seconds {a.max_seconds:g}")
    return [r if r is not None else lost for r in results], duration


# -------------------------------------------------------------------------------------- metrics
def pct(xs: list[float], q: float) -> float:
    """Percentile by linear interpolation between order statistics (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def tpot(r: Result) -> float:
    return (r.e2el - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def meets(r: Result, slo: dict[str, float]) -> bool:
    got = {"ttft": r.ttft, "tpot": tpot(r), "e2el": r.e2el}
    return all(got[k] * 1000 <= v for k, v in slo.items())


def latency_stats(xs: list[float], percentiles: list[float]) -> dict:
    ms = [x * 1000 for x in xs]
    d = {"mean": sum(ms) / len(ms) if ms else float("nan")}
    d.update({f"p{q:g}": pct(ms, q) for q in percentiles})
    return d


def summarise(results: list[Result], reqs: list[Request], duration: float, a) -> dict:
    done = [r for r in results if r.ok]
    out = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens or q.prompt_len for r, q in zip(results, reqs) if r.ok)
    sources = {r.token_source for r in done}
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "duration_s": duration, "completed": len(done), "failed": len(results) - len(done), "errors": errors[:5],
        "input_tokens": prompt, "output_tokens": out,
        "output_tokens_source": sources.pop() if len(sources) == 1 else ("mixed" if sources else "-"),
        "exact_output_len": sum(r.output_tokens == r.requested for r in done),
        "request_throughput": len(done) / duration, "output_throughput": out / duration,
        "total_token_throughput": (out + prompt) / duration,
        "goodput": sum(meets(r, a.goodput) for r in done) / duration if a.goodput else None,
        "ttft_ms": latency_stats([r.ttft for r in done], a.metric_percentiles),
        "tpot_ms": latency_stats([tpot(r) for r in done], a.metric_percentiles),
        "itl_ms": latency_stats([g for r in done for g in r.itl], a.metric_percentiles),
        "e2el_ms": latency_stats([r.e2el for r in done], a.metric_percentiles),
    }


# -------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(kind: str, ckpt: Path, port: int, name: str, a) -> list[str]:
    if kind == "dsv4":
        return [sys.executable, "-m", "v4.cli", "serve", "--checkpoint", str(ckpt), "--host", HOST, "--port", str(port),
                "--served-model-name", name, "--max-num-seqs", str(a.max_concurrency), "--dtype", "float32"]
    exe = shutil.which("transformers") or sys.exit("`transformers` is not on PATH (pip install transformers)")
    return [exe, "serve", str(ckpt), "--host", HOST, "--port", str(port), "--device", "cpu", "--dtype", "float32"]


def server_env(threads: int) -> dict:
    env = {**os.environ, **SERVER_ENV, **{v: str(threads) for v in THREAD_VARS}}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Server:
    """One server subprocess: started, waited for, stopped (SIGTERM, then kill)."""

    def __init__(self, kind: str, ckpt: Path, name: str, a):
        self.kind, self.name, self.port = kind, name, free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.cmd = server_command(kind, ckpt, self.port, name, a)
        self.log_path = CACHE / "logs" / f"{kind}-{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.threads, self.proc = a.server_threads, None

    def start(self) -> None:
        log(f"[{self.kind}] starting: {shlex.join(self.cmd)}  (log {self.log_path})")
        self.logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=server_env(self.threads), stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.perf_counter()
        with httpx.Client(timeout=5.0, trust_env=False) as c:
            while time.perf_counter() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} server exited with code {self.proc.returncode}\n{self.log_tail()}")
                if self.ready(c):
                    return time.perf_counter() - t0
                time.sleep(0.5)
        raise RuntimeError(f"{self.kind} server not ready after {timeout:g} s\n{self.log_tail()}")

    def ready(self, c: httpx.Client) -> bool:
        try:
            if c.get(f"{self.url}/health").status_code != 200:
                return False
            models = c.get(f"{self.url}/v1/models").json().get("data") or []
        except (httpx.HTTPError, ValueError):
            return False
        return any(m.get("id") == self.name for m in models)

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"[{self.kind}] no exit {grace:g} s after SIGTERM: killing pid {self.proc.pid}")
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.logf.close()

    def log_tail(self, n: int = 25) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join("    | " + x for x in lines)


# ------------------------------------------------------------------------------------ one target
async def bench_url(url: str, kind: str, model: str, reqs: list[Request], a) -> dict:
    """Warm-up (one short request, not counted), then the measured load."""
    warm = Request(-1, reqs[0].prompt, reqs[0].prompt_len, min(4, reqs[0].output_len), 0.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), trust_env=False) as c:
        w = await send(c, f"{url}/v1/completions", request_body(kind, model, warm), a.request_timeout)
    if not w.ok:
        raise RuntimeError(f"{kind}: the warm-up request failed: {w.error}")
    log(f"[{kind}] warm-up ok ({w.e2el:.2f} s); load: {len(reqs)} requests, concurrency {a.max_concurrency}, "
        f"rate {a.request_rate:g}/s")
    results, duration = await run_load(f"{url}/v1/completions", kind, model, reqs, a)
    s = summarise(results, reqs, duration, a)
    s["requests"] = [
        {"ttft_s": r.ttft, "e2el_s": r.e2el, "output_tokens": r.output_tokens, "ok": r.ok, "error": r.error}
        for r in results
    ]
    return s


def bench_server(kind: str, ckpt: Path, reqs: list[Request], a) -> dict:
    name = f"dsv4-{Path(a.config).stem}" if kind == "dsv4" else str(ckpt)
    srv = Server(kind, ckpt, name, a)
    try:
        srv.start()
        log(f"[{kind}] ready after {srv.wait_ready(a.ready_timeout):.1f} s on {srv.url}")
        s = asyncio.run(bench_url(srv.url, kind, name, reqs, a))
    except RuntimeError as e:
        log(f"[{kind}] FAILED: {e}")
        return {"error": str(e)}
    finally:
        srv.stop()
    s["server_command"] = shlex.join(srv.cmd)
    return s


# ---------------------------------------------------------------------------------------- report
ROWS = [("duration (s)", "duration_s", "{:.1f}"), ("completed", "completed", "{}"), ("failed", "failed", "{}"),
        ("input tokens", "input_tokens", "{}"), ("output tokens", "output_tokens", "{}"),
        ("  counted from", "output_tokens_source", "{}"), ("  exact length", "exact_output_len", "{}"),
        ("request throughput (req/s)", "request_throughput", "{:.3f}"),
        ("output throughput (tok/s)", "output_throughput", "{:.2f}"),
        ("total throughput (tok/s)", "total_token_throughput", "{:.2f}"), ("goodput (req/s)", "goodput", "{:.3f}")]


def table_rows(s: dict) -> list[tuple[str, str]]:
    if "error" in s:
        return [("error", s["error"].splitlines()[0][:40])]
    rows = [(label, "-" if s.get(k) is None else fmt.format(s[k])) for label, k, fmt in ROWS]
    for m in ("ttft", "tpot", "itl", "e2el"):
        st = s[f"{m}_ms"]
        rows += [(f"{m.upper()} {k} (ms)", f"{v:.1f}") for k, v in st.items()]
    return rows


def print_table(summaries: dict) -> None:
    cols = {k: dict(table_rows(s)) for k, s in summaries.items()}
    labels = list(dict.fromkeys(lab for c in cols.values() for lab in c))
    w = max(len(x) for x in labels) + 2
    log("")
    log("".ljust(w) + "".join(k.rjust(16) for k in cols))
    for lab in labels:
        log(lab.ljust(w) + "".join(c.get(lab, "").rjust(16) for c in cols.values()))
    for k, s in summaries.items():
        for e in s.get("errors", []):
            log(f"  {k} error: {e}")


def ratio_line(summaries: dict, a) -> tuple[float | None, str]:
    d, t = summaries.get("dsv4", {}), summaries.get("transformers", {})
    if "output_throughput" not in d or not t.get("output_throughput"):
        return None, "ratio: needs both servers' figures"
    r = d["output_throughput"] / t["output_throughput"]
    small = Path(a.config).stem == "small" and a.max_concurrency == 16 and (a.input_len, a.output_len) == (128, 64)
    verdict = (
        f"target >= {TARGET_RATIO:g}x: {'PASS' if r >= TARGET_RATIO else 'MISS'}"
        if small
        else "target applies to small, 16 clients, 128/64"
    )
    ttft = "; ".join(
        f"{k} TTFT p50 {s['ttft_ms'].get('p50', float('nan')):.0f} ms, p99 "
        f"{s['ttft_ms'].get('p99', float('nan')):.0f} ms"
        for k, s in (("dsv4", d), ("transformers", t))
    )
    return r, (f"output tok/s dsv4 / transformers = {d['output_throughput']:.2f} / {t['output_throughput']:.2f} = "
               f"{r:.2f}x ({verdict}); {ttft}")


def header(a) -> str:
    import torch

    return (
        f"# {shlex.join(['python', *sys.argv])} | bench torch threads {torch.get_num_threads()}, "
        f"server threads {a.server_threads}, cores {os.cpu_count()}, load avg {os.getloadavg()[0]:.2f} before the run "
        f"(other work on these cores skews every figure) | torch {torch.__version__}"
    )


# ------------------------------------------------------------------------------------------ main
def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slo = {}
    for it in items or []:
        k, _, v = it.partition(":")
        if k not in ("ttft", "tpot", "e2el") or not v:
            raise SystemExit(f"--goodput: expected ttft:<ms> tpot:<ms> e2el:<ms>, got {it!r}")
        slo[k] = float(v)
    return slo


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="See the module docstring (bench/serve.py) for what is measured and how.")
    p.add_argument("--target", choices=["dsv4", "transformers", "both"], default="both")
    p.add_argument("--base-url", help="bench this already running server instead of starting one (127.0.0.1 only)")
    p.add_argument("--model", help="with --base-url: the model name to send")
    p.add_argument(
        "--api",
        choices=["openai", "transformers"],
        default="openai",
        help="with --base-url: how to force the output length (openai: ignore_eos; transformers: generation_config)",
    )
    p.add_argument("--config", help="model config for the checkpoint (default small; tiny with --smoke)")
    p.add_argument(
        "--checkpoint", type=Path, help="use this HF checkpoint directory (with tokenizer.json) instead of building one"
    )
    p.add_argument("--weights-seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int)
    p.add_argument(
        "--num-prompts-transformers", type=int, help="transformers gets the first N of the same prompts (default all)"
    )
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf: all at t=0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:2000 tpot:200 e2el:20000")
    p.add_argument("--metric-percentiles", default="50,99", help="comma-separated, default 50,99")
    p.add_argument("--server-threads", type=int, default=2, help="OMP/MKL threads of each server (default 2)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    p.add_argument(
        "--max-seconds", type=float, help="seconds of load per server; open requests are then cancelled (default 1800)"
    )
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument(
        "--smoke", action="store_true", help="tiny config, 4 prompts of 16 in / 8 out: the script itself, < 1 min"
    )
    a = p.parse_args(argv)
    for k, (smoke, full) in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, smoke if a.smoke else full)
    a.goodput = parse_goodput(a.goodput)
    a.metric_percentiles = [float(x) for x in a.metric_percentiles.split(",") if x.strip()]
    if a.base_url and not a.base_url.startswith(f"http://{HOST}:"):
        p.error(f"--base-url must be http://{HOST}:PORT (the bench talks to this machine only)")
    if a.base_url and not a.model:
        p.error("--base-url needs --model")
    return a


def run_targets(a, reqs: list[Request], ckpt: Path | None) -> dict:
    if a.base_url:
        kind = "transformers" if a.api == "transformers" else "server"
        return {kind: asyncio.run(bench_url(a.base_url.rstrip("/"), a.api, a.model, reqs, a))}
    targets = TARGETS if a.target == "both" else (a.target,)
    out = {}
    for kind in targets:
        n = a.num_prompts_transformers if kind == "transformers" and a.num_prompts_transformers else len(reqs)
        out[kind] = bench_server(kind, ckpt, reqs[:n], a)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    log(header(a))
    ckpt = a.checkpoint or (None if a.base_url else ensure_checkpoint(a.config, a.weights_seed))
    reqs = make_workload(a, token_counter(ckpt))
    lens = sorted(r.prompt_len for r in reqs)
    log(f"workload: {len(reqs)} prompts, prompt tokens {lens[0]}..{lens[-1]} (BOS included), output "
        f"{min(r.output_len for r in reqs)}..{max(r.output_len for r in reqs)}, seed {a.seed}; checkpoint {ckpt}")
    check = None
    if ckpt is not None:
        check, line = tokenisation_check(ckpt, reqs[0].prompt)
        log(line)
    summaries = run_targets(a, reqs, ckpt)
    print_table(summaries)
    ratio, line = ratio_line(summaries, a)
    log(line)
    if a.json:
        doc = {
            "header": header(a),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "checkpoint": str(ckpt),
            "tokenisation_agrees": check,
            "ratio_output_throughput": ratio,
            "results": summaries,
        }
        a.json.write_text(json.dumps(doc, indent=1, default=str))
        log(f"wrote {a.json}")
    return 0 if all("error" not in s for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
