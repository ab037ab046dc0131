"""Graph-captured decode (v4/graphs.py, `DecodeBatch`) without a GPU.

A CUDA graph replays the kernels recorded at capture with the launch parameters recorded at
capture; only the contents of its buffers change. So a decode step may be captured only if
(1) nothing in it reads device data on the host and (2) every op and kernel launch is the same
whatever the batch layout is. Both are checked here on CPU, with the cuda backend's kernels in
Triton's interpreter: (1) with HostSyncGuard (itself tested against ops known to sync), (2) by
recording every aten op and every Triton launch (grid and scalar arguments) of two steps with
different slots, positions and tokens and requiring the two traces to be equal. Then the numbers:
the static decode path equals the eager one (reference backend in fp64, bit for bit up to fp64
rounding; cuda backend vs eager cuda and vs reference), padding rows leave real sequences alone,
and the engine with graphs on gives the same tokens as with graphs off.
"""

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import backends
from tests.conftest import rel_err, run_step
from v4.config import ConfigDeprecationWarning, ConfigError, RuntimeConfig, build_runtime, load_config_file
from v4.engine import LLM, SamplingParams, graph_mode
from v4.errors import InputError
from v4.graphs import DecodeGraphs, GraphCaptureError, HostSyncGuard, default_buckets
from v4.model import DecodeBatch, Transformer
from v4.runtime import random_weights

pytestmark = pytest.mark.gpu  # bench/gpu_check.sh runs these natively on a GPU

GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def cfg():
    return load_config_file("tiny")[0]


def _model(cfg, backend, dtype=torch.float32, seed=4):
    return Transformer(cfg, random_weights(cfg, seed), backends.get_ops(backend), dtype)


@pytest.fixture(scope="module")
def cuda_model(cfg):
    return _model(cfg, "cuda")


# ---------------------------------------------------------------- the guard itself


@pytest.mark.parametrize("bad", [
    lambda t: t.sum().item(),
    lambda t: int(t.max()),
    lambda t: bool(t.any()),
    lambda t: t.nonzero(),
    lambda t: t[t > 0],
    lambda t: t.masked_select(t > 0),
    lambda t: torch.bincount(t.long().abs()),
    lambda t: torch.repeat_interleave(t.long().abs()),
    lambda t: t.unique(),
    lambda t: torch.equal(t, t),
    lambda t: t.tolist(),
])
def test_guard_rejects_what_a_capture_cannot_hold(bad):
    t = torch.tensor([3, -1, 2, 0])
    with pytest.raises(GraphCaptureError):
        with HostSyncGuard():
            bad(t)


def test_guard_lets_device_side_indexing_through():
    t = torch.arange(10.0)
    with HostSyncGuard():
        i = torch.tensor([1, 3]).long()
        t[i] = t[i] * 2 + 1
        y = torch.where(t > 4, t, -1.0).sort().values
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 1]), output_size=4)
    assert t[1] == 3 and t[3] == 7 and y.shape == (10,)


def test_guard_catches_the_eager_step(cfg):
    # the StepBatch path plans on the host (boolean masks, repeat_interleave): what a capture must not hold
    m = _model(cfg, "reference")
    cache = m.new_cache(1, 32)
    slot = cache.alloc()
    with pytest.raises(GraphCaptureError):
        with HostSyncGuard():
            run_step(m, torch.tensor([5, 6]), cache, [slot], [0], [2])


# ---------------------------------------------------------------- static path == eager path


def _prefill(m, cache, prompts):
    slots = [cache.alloc() for _ in prompts]
    ids = torch.cat([torch.tensor(p) for p in prompts])
    run_step(m, ids, cache, slots, [0] * len(prompts), [len(p) for p in prompts], logits="none")
    return slots


PROMPTS = [[0] + list(range(7, 7 + n)) for n in (14, 2, 30)]  # positions 15 / 3 / 31: windows and entries close next


def _static_vs_eager_steps(cfg, q: int, max_seq_len: int, steps: int, logits: str):
    """Decode `steps` steps of q tokens per PROMPTS sequence (in fp64 on the reference backend, the
    sequences' order flipping every other step) twice: as StepBatches in cache a and as DecodeBatches
    with a padding row on a scratch slot in cache b, asserting that the logits agree each step.
    Returns the caches, their slots and the sequences' final lengths: (a, b, sa, sb, pos)."""
    m = _model(cfg, "reference", torch.float64)
    a, b = m.new_cache(4, max_seq_len), m.new_cache(4, max_seq_len)
    sa, sb = _prefill(m, a, PROMPTS), _prefill(m, b, PROMPTS)
    scratch = b.alloc()
    pos = [len(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        order = [2, 0, 1] if step % 2 else [0, 1, 2]
        ids = torch.randint(3, cfg.vocab_size, (3 * q,), generator=g)
        want, _ = run_step(m, ids, a, [sa[i] for i in order], [pos[i] for i in order], [q] * 3, logits)
        for i in order:
            b.reserve(sb[i], pos[i] + q)
        b.reserve(scratch, q)
        slots = torch.tensor([sb[i] for i in order] + [scratch])
        positions = torch.tensor([pos[i] for i in order] + [0])
        batch = DecodeBatch(slots, positions, b.max_seq_len, q)
        got, _ = m.forward(torch.cat([ids, torch.zeros(q, dtype=torch.long)]), batch, b, logits)
        assert rel_err(got[:3 * q], want) < 1e-12, step
        for i in order:
            b.seq_len[sb[i]] = pos[i] + q
            pos[i] += q
    return a, b, sa, sb, pos


def test_decode_batch_equals_step_batch_on_the_reference_backend(cfg):
    # fp64 reference: the static layout (HCA lists padded to the cache capacity, ring rows without a
    # mask, compressor rows from the device, padding rows on a scratch slot) changes nothing
    a, b, sa, sb, _ = _static_vs_eager_steps(cfg, q=1, max_seq_len=48, steps=6, logits="last")
    for la, lb in zip(a.layers, b.layers):
        s = torch.tensor(sa)
        assert torch.allclose(la.ring[s], lb.ring[torch.tensor(sb)], rtol=0, atol=1e-12)
        if la.state_kv is not None:
            assert torch.allclose(la.state_kv[s], lb.state_kv[torch.tensor(sb)], rtol=0, atol=1e-12)


def _live_state_rows(cache, layer: int, n: int) -> list[int]:
    """State rows a sequence of n tokens still reads: the open window's n mod m tokens (and, for the
    overlapping CSA compressor, the previous window). A step that closes a window with several new
    tokens folds them into the entry without writing their rows, so the other rows depend on step shapes."""
    m = cache.cfg.layer_ratio(layer)
    cur = m if cache.layers[layer].index_pool is not None else 0
    return (list(range(m)) if cur and n >= m else []) + [cur + j for j in range(n % m)]


def test_verify_batch_equals_step_batch_on_the_reference_backend(cfg):
    # speculative verification's captured form: q = 3 tokens per sequence in a DecodeBatch (the
    # compressors take them one token per call) against the same tokens as a StepBatch, fp64
    a, b, sa, sb, pos = _static_vs_eager_steps(cfg, q=3, max_seq_len=64, steps=5, logits="all")
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        for x, y, n in zip(sa, sb, pos):
            assert torch.allclose(la.ring[x], lb.ring[y], rtol=0, atol=1e-12)
            if la.state_kv is not None:
                live = _live_state_rows(a, i, n)
                assert torch.allclose(la.state_kv[x, live], lb.state_kv[y, live], rtol=0, atol=1e-12)
                assert torch.allclose(la.state_score[x, live], lb.state_score[y, live], rtol=0, atol=1e-12)
        if la.pool is not None:
            assert torch.allclose(la.pool, lb.pool, rtol=0, atol=1e-12)  # same block order in both caches


def _eager_steps(m, prompts, steps, g_seed=1):
    cache = m.new_cache(len(prompts), 64)
    slots = _prefill(m, cache, prompts)
    pos = [len(p) for p in prompts]
    g = torch.Generator().manual_seed(g_seed)
    out = []
    for n in steps:  # n: how many of the sequences take part in this step (the first n)
        ids = torch.randint(3, m.cfg.vocab_size, (n,), generator=g)
        lg, _ = run_step(m, ids, cache, slots[:n], pos[:n], [1] * n, "last")
        out.append((ids.tolist(), lg.cpu()))
        for i in range(n):
            pos[i] += 1
    return out


@pytest.mark.slow  # > 20 s on 2 CPU cores
def test_graph_steps_match_eager_steps_on_the_cuda_backend(cuda_model):
    # 3 sequences, then 2, then 1 (buckets 4, 2, 1); the first step closes the window (position 15)
    # and entries of every compressor (positions 3, 15, 31)
    m = cuda_model
    steps = [3, 2, 1]
    want = _eager_steps(m, PROMPTS, steps)
    cache = m.new_cache(5, 64)
    graphs = DecodeGraphs(m, cache, max_batch=4)
    assert graphs.mode == ("cuda" if GPU else "emulate") and graphs.buckets == [1, 2, 4]
    slots = _prefill(m, cache, PROMPTS)
    pos = [len(p) for p in PROMPTS]
    for n, (ids, lg) in zip(steps, want):
        got = graphs.step(slots[:n], pos[:n], ids)
        assert got.shape == lg.shape and rel_err(got.cpu(), lg) < 1e-5
        for i in range(n):
            assert cache.seq_len[slots[i]] == pos[i] + 1
            pos[i] += 1
    assert sorted(graphs._graphs) == [1, 2, 4]


class _Trace(TorchDispatchMode):
    """Every aten op (name, tensor shapes / dtypes, other arguments) dispatched inside."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        def desc(x):
            if isinstance(x, torch.Tensor):
                return ("T", tuple(x.shape), x.dtype)
            if isinstance(x, (torch.UntypedStorage, torch.TypedStorage)):
                return ("S", x.nbytes())
            if isinstance(x, (list, tuple)):
                return tuple(desc(v) for v in x)
            return (
                x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)) else type(x).__name__
            )

        self.ops.append((str(func), desc(args), desc(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch from now on, as (kernel name, grid, scalar arguments), recorded where Triton's
    interpreter runs a kernel (CPU only)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        g = grid(kwargs) if callable(grid) else grid
        scal = [a for a in list(args) + sorted(kwargs.items()) if not isinstance(a, torch.Tensor)
                and not (isinstance(a, tuple) and isinstance(a[1], torch.Tensor))]
        launches.append((self.fn.__name__, tuple(g), repr(scal)))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return launches


@pytest.mark.skipif(GPU, reason="records launches of Triton's interpreter (CPU only)")
def test_two_layouts_give_the_same_ops_and_launches(cuda_model, launches):
    """What a replay assumes: the step's op sequence and every kernel's grid and scalar arguments
    do not depend on slots, positions or tokens."""
    m = cuda_model
    cache = m.new_cache(4, 64)
    graphs = DecodeGraphs(m, cache, max_batch=2, buckets=[2])
    slots = _prefill(m, cache, PROMPTS[:2])
    traces = []
    for ids, pos in (([11, 12], [15, 3]), ([300, 7], [16, 4])):  # second: entries close, the window wraps
        for s, p in zip(slots, pos):
            cache.reserve(s, p + 1)
        graphs._buf[:, :2] = torch.tensor([slots, pos])
        graphs._ids[:2] = torch.tensor(ids)
        launches.clear()
        with _Trace() as t:
            graphs._forward(2)
        traces.append((t.ops, list(launches)))
    assert len(traces[0][1]) > 20 and traces[0][0] == traces[1][0] and traces[0][1] == traces[1][1]


@pytest.mark.slow  # > 20 s on 2 CPU cores
def test_engine_with_graphs_gives_the_tokens_of_the_eager_engine(cuda_model):
    # 3 prompts, 2 sequences at once: the third joins when the first leaves, in the same persistent cache;
    # decode-only steps replay the graphs (buckets 1 and 2), mixed steps run eagerly
    prompts = [[0, 9, 8, 7], [0] + list(range(20, 34)), [0, 44, 45]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (2, 5, 6)]
    rt = RuntimeConfig(max_num_seqs=2, max_model_len=40)
    off = LLM(cuda_model, rt, graphs="off").generate(prompts, params)
    llm = LLM(cuda_model, rt, graphs="on")
    assert llm.graph_mode == ("cuda" if GPU else "emulate")
    replays = []
    step = llm.runner.graphs.step
    llm.runner.graphs.step = lambda *a: replays.append(len(a[0])) or step(*a)
    on = llm.generate(prompts, params)
    assert [r.output_ids for r in on] == [r.output_ids for r in off]
    assert set(replays) == {1, 2}
    cache = llm.runner.cache
    assert [s for s, u in enumerate(cache.in_use) if u] == [llm.runner.graphs.scratch]  # only the padding slot
    assert llm.kv_cache_usage() == 0.0


@pytest.mark.slow  # > 20 s on 2 CPU cores
def test_speculative_engine_with_graphs_gives_the_tokens_of_the_eager_engine(cuda_model):
    # verification steps (every sequence with k = 2 drafts: 3 tokens each) replay the q = 3 graphs;
    # random weights reject most drafts, so the rows they wrote are taken back after every replay
    prompts = [[0, 9, 8, 7], [0] + list(range(20, 34)), [0, 44, 45]]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (4, 7, 6)]
    off = LLM(cuda_model, RuntimeConfig(max_num_seqs=2, max_model_len=40), graphs="off").generate(prompts, params)
    rt = RuntimeConfig(
        max_num_seqs=2, max_model_len=40, speculative_config={"method": "mtp", "num_speculative_tokens": 2}
    )
    llm = LLM(cuda_model, rt, graphs="on")
    assert llm.graph_mode == ("cuda" if GPU else "emulate") and llm.runner.graphs.q == 3
    replays = []
    verify = llm.runner.graphs.verify
    llm.runner.graphs.verify = lambda *a: replays.append(len(a[0])) or verify(*a)
    on = llm.generate(prompts, params)
    assert [r.output_ids for r in on] == [r.output_ids for r in off]
    assert set(replays) == {1, 2} and llm.drafter.stats.num_drafts >= len(replays)
    assert llm.kv_cache_usage() == 0.0


@pytest.mark.skipif(GPU, reason="records launches of Triton's interpreter (CPU only)")
def test_verify_layouts_give_the_same_ops_and_launches(cuda_model, launches):
    """The q = 3 verification step, like the decode step: the same ops and launches whatever the layout."""
    m = cuda_model
    cache = m.new_cache(4, 64)
    graphs = DecodeGraphs(m, cache, max_batch=2, buckets=[2], q=3)
    slots = _prefill(m, cache, PROMPTS[:2])
    traces = []
    for ids, pos in (([11, 12, 13, 21, 22, 23], [13, 1]), ([300, 7, 8, 9, 10, 11], [15, 3])):  # second: entries close
        for s, p in zip(slots, pos):
            cache.reserve(s, p + 3)
        graphs._buf[:, :2] = torch.tensor([slots, pos])
        graphs._ids[:6] = torch.tensor(ids)
        launches.clear()
        with _Trace() as t, HostSyncGuard():
            graphs._forward(2)
        traces.append((t.ops, list(launches)))
    assert len(traces[0][1]) > 20 and traces[0][0] == traces[1][0] and traces[0][1] == traces[1][1]


def test_a_step_with_hooks_attached_runs_eagerly(cuda_model):
    # parity records hooks on prompts; a one-token prompt's step is decode-shaped, and a replayed graph
    # would skip its hooks (seen on the H200: the boundaries suite's 1-token prompt recorded none)
    llm = LLM(cuda_model, RuntimeConfig(max_num_seqs=2, max_model_len=16), graphs="on", buckets=[1, 2])
    replays, seen = [], []
    step = llm.runner.graphs.step
    llm.runner.graphs.step = lambda *a: replays.append(len(a[0])) or step(*a)
    rid = llm.add_request([7], SamplingParams(max_tokens=3, ignore_eos=True))
    cuda_model.hook = lambda name, t: seen.append((name, t.shape[0]))
    try:
        llm.step()  # the prompt's only token, with hooks attached: eager
    finally:
        cuda_model.hook = None
    assert replays == [] and ("layers.0.input", 1) in seen
    llm.step()  # its first decode token, no hooks: replayed
    assert replays == [1]
    assert llm.sequence(rid).output_ids and len(llm.sequence(rid).output_ids) == 2


# ---------------------------------------------------------------- choices and errors


def test_graph_mode_choices(cfg, cuda_model):
    ref = _model(cfg, "reference")
    assert graph_mode("auto", ref) == "off" and graph_mode("off", cuda_model) == "off"
    assert graph_mode("auto", cuda_model) == ("cuda" if GPU else "off")  # auto never emulates
    assert graph_mode("on", cuda_model) == ("cuda" if GPU else "emulate")
    with pytest.raises(InputError, match="only the cuda backend"):
        graph_mode("on", ref)
    with pytest.raises(InputError, match="does not support graph-captured decode"):
        DecodeGraphs(ref, ref.new_cache(2, 16), 1)
    fb = backends.get_ops("cuda", allow_fallback=True)
    assert fb.capturable  # nothing filled from reference: still capturable


def test_runtime_field_accepts_yaml_booleans():
    assert build_runtime({"decode_graphs": False}).decode_graphs == "off"
    assert build_runtime({"decode_graphs": True}).decode_graphs == "on"
    with pytest.raises(ConfigError, match="runtime.decode_graphs"):
        build_runtime({"decode_graphs": "sometimes"})


def test_old_cuda_graphs_field_still_works_and_says_the_new_name():
    with pytest.warns(ConfigDeprecationWarning,
                      match="'runtime.cuda_graphs' is deprecated; write 'runtime.decode_graphs: off'"):
        assert build_runtime({"cuda_graphs": False}).decode_graphs == "off"
    with pytest.warns(ConfigDeprecationWarning):
        assert build_runtime({"cuda_graphs": True}).decode_graphs == "on"
    with pytest.raises(ConfigError, match="runtime.cuda_graphs"):
        build_runtime({"cuda_graphs": "sometimes"})
    with pytest.warns(ConfigDeprecationWarning):  # the file's old name, the flag's new one: the flag wins
        assert build_runtime({"cuda_graphs": "on"}, {"decode_graphs": "off"}).decode_graphs == "off"
    with pytest.warns(ConfigDeprecationWarning), pytest.raises(ConfigError, match="disagree"):
        build_runtime({"cuda_graphs": "on", "decode_graphs": "off"})


def test_step_refuses_bad_layouts(cuda_model):
    m = cuda_model
    cache = m.new_cache(3, 32)
    graphs = DecodeGraphs(m, cache, max_batch=2)
    assert default_buckets(2) == [1, 2] and default_buckets(20) == [1, 2, 4, 8, 16, 20]
    a = cache.alloc()
    with pytest.raises(InputError, match="exceeds the largest captured batch"):
        graphs.step([a, a + 1, a + 2], [1, 1, 1], [5, 5, 5])
    with pytest.raises(InputError, match="outside the vocabulary"):
        graphs.step([a], [1], [m.cfg.vocab_size])
    with pytest.raises(InputError, match="distinct"):
        graphs.step([a, a], [1, 1], [5, 5])
    with pytest.raises(InputError, match="distinct"):
        graphs.step([graphs.scratch], [1], [5])
    m.hook = lambda name, t: None
    try:
        with pytest.raises(InputError, match="hooks"):
            graphs.step([a], [1], [5])
    finally:
        m.hook = None
    with pytest.raises(InputError, match="exceeds the cache's max_seq_len"):
        graphs.step([a], [32], [5])


def test_cli_generate_with_graphs_on(capsys):
    import json

    from v4 import cli

    args = ["generate", "--config", "tiny", "--backend", "cuda", "--ids", "0,5,6,7", "--max-new-tokens", "4", "--json"]
    assert cli.main(args + ["--decode-graphs", "on"]) == 0
    on = json.loads(capsys.readouterr().out)
    assert cli.main(args + ["--decode-graphs", "off"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert on["decode"] == ("cuda graphs" if GPU else "graph path, emulated") and off["decode"] == "eager"
    assert on["generated_ids"] == off["generated_ids"] and len(on["generated_ids"]) == 4
    # the old flag: the same run, and one line on stderr naming the new one
    with pytest.warns(ConfigDeprecationWarning, match="--cuda-graphs is deprecated; use --decode-graphs on"):
        assert cli.main(args + ["--cuda-graphs", "on"]) == 0
    assert json.loads(capsys.readouterr().out)["decode"] == on["decode"]
    assert cli.main(args + ["--cuda-graphs", "on", "--decode-graphs", "off"]) == 2
    assert "disagree" in capsys.readouterr().err


def test_deprecation_warning_is_one_line_on_the_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "v4.cli", "info", "--config", "tiny", "--json", "--cuda-graphs", "off"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "dsv4: warning: --cuda-graphs is deprecated; use --decode-graphs off"


# ---------------------------------------------------------------- the capture protocol behind the backend


class _FakeStreamAPI:
    """torch.cuda / torch.npu's stream-graph API, recording what StreamCapture calls."""

    def __init__(self):
        self.calls = []
        api = self

        class Graph:
            def __init__(self):
                api.calls.append("Graph()")

            def replay(self):
                api.calls.append("replay")

        class Ctx:
            def __init__(self, name):
                self.name = name

            def __enter__(self):
                api.calls.append(f"enter {self.name}")

            def __exit__(self, *exc):
                api.calls.append(f"exit {self.name}")

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                api.calls.append(f"{self.name} waits {other.name}")

        self.Graph, self._ctx, self._stream = Graph, Ctx, Stream

    def Stream(self, device):  # noqa: N802 - the torch name
        self.calls.append(f"Stream({device})")
        return self._stream("side")

    def current_stream(self, device):
        return self._stream("main")

    def stream(self, s):
        return self._ctx(f"stream {s.name}")

    def graph_pool_handle(self):
        self.calls.append("pool")
        return "pool-1"

    def graph(self, g, pool=None):
        self.calls.append(f"graph(pool={pool})")
        return self._ctx("capture")


@pytest.mark.parametrize("mode,what", [("cuda", "CUDA graph"), ("npu", "ACL graph (torch.npu.NPUGraph)")])
def test_stream_capture_is_one_protocol_for_cuda_and_npu_graphs(mode, what):
    """CUDA graphs and ACL graphs go through the same StreamCapture: warm-up twice on a side stream,
    one memory pool for every bucket, capture once; a replay reruns the graph and gives the outputs
    captured. A host read mid-capture becomes one GraphCaptureError naming the setting to turn off."""
    from v4.graphs import StreamCapture

    api = _FakeStreamAPI()
    cap = StreamCapture(mode, api, api.Graph, "dev:0", what)
    runs = []
    rec = cap.capture(lambda: runs.append(len(runs)) or "out", 4)
    assert runs == [0, 1, 2] and api.calls == [
        "Stream(dev:0)", "side waits main", "enter stream side", "exit stream side", "main waits side",
        "pool", "Graph()", "graph(pool=pool-1)", "enter capture", "exit capture"]
    api.calls.clear()
    assert rec.replay() == "out" and api.calls == ["replay"] and len(runs) == 3
    api.calls.clear()
    cap.capture(lambda: None, 2)
    assert "pool" not in api.calls and "graph(pool=pool-1)" in api.calls  # buckets share the pool

    def host_read():
        if api.calls[-1] == "enter capture":
            raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(GraphCaptureError, match=f"batch 8 as a {re.escape(what)} failed.*decode_graphs: off"):
        cap.capture(host_read, 8)


def test_cuda_backend_hands_over_cuda_graphs_on_a_gpu_only(cuda_model):
    from v4.graphs import StreamCapture

    ops = cuda_model.ops
    assert ops.graph_capture(torch.device("cpu")) is None  # the interpreter on CPU: emulation
    cap = ops.graph_capture(torch.device("cuda", 0))
    assert isinstance(cap, StreamCapture) and cap.mode == "cuda"
    assert cap.api is torch.cuda and cap.graph_class is torch.cuda.CUDAGraph


class _RecordingCapture:
    """A backend's capture as the core sees it (mode, capture, replay), run eagerly under HostSyncGuard."""

    mode = "fake"

    def __init__(self):
        self.captured = []

    def capture(self, fn, batch):
        self.captured.append(batch)
        fn()  # the warm-up a real capture does

        class Replay:
            def replay(self):
                with HostSyncGuard():
                    return fn()

        return Replay()


def test_core_takes_the_capture_from_the_backend(cuda_model, monkeypatch):
    """graph_mode and DecodeGraphs ask the ops for their device's graphs (`graph_capture`): with a
    backend that hands one over, auto decodes through it, bucket by bucket, and gives the eager tokens."""
    fake = _RecordingCapture()
    monkeypatch.setattr(cuda_model.ops, "graph_capture", lambda device: fake)
    assert graph_mode("auto", cuda_model) == "fake" and graph_mode("on", cuda_model) == "fake"
    prompts = [[0, 9, 8, 7], [0, 44, 45]]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    rt = RuntimeConfig(max_num_seqs=2, max_model_len=40)
    off = LLM(cuda_model, rt, graphs="off").generate(prompts, params)
    llm = LLM(cuda_model, rt)  # runtime.decode_graphs: auto
    assert llm.graph_mode == "fake" and llm.runner.graphs.capturer is fake
    assert [r.output_ids for r in llm.generate(prompts, params)] == [r.output_ids for r in off]
    assert fake.captured == [2]
    with pytest.raises(InputError, match="captures fake graphs"):
        DecodeGraphs(cuda_model, cuda_model.new_cache(3, 16), 2, mode="cuda")
