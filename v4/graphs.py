"""Decode steps replayed from captured graphs: the bucket policy here, the capture behind the backend.

A V4 decode step launches a few hundred small kernels; at small batch sizes the host's launch
overhead, not the device, sets the pace. `DecodeGraphs` captures the whole decode step once per
batch size ("bucket") as a graph and replays it, so a step costs one graph launch.

What makes the step capturable is `v4.model.DecodeBatch`: the batch layout (slots, positions, token
ids) lives in static device buffers that the host overwrites before each replay, and nothing in the
step reads device data back or sizes a tensor from it (index widths come from the cache's capacity).
`Transformer.forward` is pure compute, so the host-side bookkeeping happens here: token ids are
checked, cache blocks reserved before the replay and `cache.seq_len` advanced after it. The engine's
runner (`v4/engine/runner.py`) calls `step` for every step made only of decode tokens.

Buckets (the core's policy): 1, 2, 4, 8, then multiples of 8 up to `max_batch` (the engine's
max_num_seqs). A step of n sequences runs the smallest bucket >= n; the rows past n are padding on a
scratch cache slot that no sequence owns (position 0, token 0), so they write only that slot's ring
row and compressor state and are never read.

How a bucket is captured and replayed is the backend's (`GraphCapture`): an ops object whose every
op is graph-safe says so with `capturable = True` and hands over its device's graphs from
`ops.graph_capture(device)` (None where that device has none). Modes (`GraphCapture.mode`):
- "cuda": the cuda backend on a GPU: one `torch.cuda.CUDAGraph` per bucket (`StreamCapture`);
- "npu": the ascend backend on an NPU: one `torch.npu.NPUGraph` per bucket, torch_npu's ACL graph
  (vllm-ascend's ACLGraphWrapper), through the same `StreamCapture` on the `torch.npu` API;
- "emulate": where the device has no graphs (the cuda backend in Triton's interpreter on CPU).
  Nothing is captured: each step runs the same DecodeBatch forward on the same static buffers,
  under `HostSyncGuard`, which raises on every op that a capture would reject (a device -> host
  read, an output shaped by tensor contents). That is how CI checks the captured path without a GPU.
A captured bucket is warmed up first (which compiles the Triton kernels) with every row on the
scratch slot; all buckets share one memory pool.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import InputError
from .batch import DecodeBatch

aten = torch.ops.aten

# Ops that read device memory on the host or size their output from tensor contents: a graph capture
# (CUDA or ACL) fails on them ("operation not permitted when stream is capturing"), or worse, bakes the
# value seen at capture time into every replay.
_HOST_READS = {
    aten._local_scalar_dense: "reads a tensor element on the host (.item(), int(t), bool(t), if t)",
    aten.nonzero: "sizes its output from tensor contents",
    aten.masked_select: "sizes its output from tensor contents",
    aten._unique2: "sizes its output from tensor contents",
    aten.unique_dim: "sizes its output from tensor contents",
    aten.unique_consecutive: "sizes its output from tensor contents",
    aten.bincount: "reads the largest value on the host to size its output",
    aten._unique: "sizes its output from tensor contents",
    aten.equal: "returns a host bool",
    aten.is_nonzero: "returns a host bool",
    aten.allclose: "returns a host bool",
}


class GraphCaptureError(RuntimeError):
    """An op in a decode step that a graph capture cannot hold."""


def _refuse_tolist(*_args, **_kwargs):
    raise GraphCaptureError(
        "Tensor.tolist() reads tensor contents on the host: a captured decode step cannot contain it"
    )


class HostSyncGuard(TorchDispatchMode):
    """Raise on every op that a graph capture would reject (see `_HOST_READS`), on any device.

    On a GPU or NPU the capture itself refuses such ops; on CPU nothing would, so the emulated mode and the
    tests run the decode step under this guard. Boolean-mask indexing and
    `repeat_interleave(repeats_tensor)` without `output_size` count too (they call nonzero / a sum
    read-back internally, below the dispatcher where this mode cannot see), and so does
    `Tensor.tolist()`, which reads a CPU tensor without dispatching any op.
    """

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        torch.Tensor.tolist = _refuse_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _HOST_READS.get(func.overloadpacket) or _HOST_READS.get(func)
        if why is None and func.overloadpacket in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype == torch.bool for t in idx):
                why = "indexes with a boolean mask (a nonzero inside)"
        if why is None and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            why = "sums its repeats on the host to size its output"
        if why is not None:
            raise GraphCaptureError(f"{func} {why}: a captured decode step cannot contain it")
        return func(*args, **kwargs)


# ------------------------------------------------------------------ capture: the backend's side
class GraphCapture:
    """How a backend records a decode step and replays it: the protocol behind `DecodeGraphs`.

    `capture(fn, batch)` runs `fn` (the step of one bucket on the static buffers; warm-up included)
    and returns an object whose `replay()` reruns the recorded step on the buffers' current contents
    and returns fn's outputs (the same tensors every time). `mode` names the kind ("cuda", "npu",
    "emulate": the runner's `graph_mode` and `DECODE_LABEL`)."""

    mode: str = ""

    def capture(self, fn, batch: int):
        raise NotImplementedError


class EmulatedCapture(GraphCapture):
    """No graph: every replay runs the step again, eagerly, under `HostSyncGuard` (the CPU check of
    the captured path: the same static buffers and the same refusals as a real capture)."""

    mode = "emulate"

    def capture(self, fn, batch: int):
        return _Emulated(fn)


class _Emulated:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        with HostSyncGuard():
            return self.fn()


class StreamCapture(GraphCapture):
    """A capture through torch's stream-graph API, which `torch.cuda` (CUDA graphs) and `torch.npu`
    (torch_npu's ACL graphs) share: `Stream`, `current_stream`, `stream`, `graph_pool_handle`,
    `graph(g, pool=...)` and a graph class with `replay()`. A backend builds it in its
    `ops.graph_capture(device)` with its API module and graph class; the warm-up on a side stream,
    the one memory pool and the capture are the same for both.

    mode: "cuda" | "npu"; what: the graph's name in messages ("CUDA graph")."""

    def __init__(self, mode: str, api, graph_class, device, what: str):
        self.mode, self.api, self.graph_class, self.device, self.what = mode, api, graph_class, device, what
        self.pool = None  # every bucket's graph shares one memory pool

    def capture(self, fn, batch: int):
        api = self.api
        side = api.Stream(self.device)
        side.wait_stream(api.current_stream(self.device))
        with api.stream(side):  # warm-up off the capture stream: Triton compiles, allocator settles
            for _ in range(2):
                fn()
        api.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = api.graph_pool_handle()
        graph = self.graph_class()
        try:
            with api.graph(graph, pool=self.pool):
                out = fn()
        except RuntimeError as e:  # a host read or sync inside the step: the runtime refuses it mid-capture
            raise GraphCaptureError(f"capturing the decode step of batch {batch} as a {self.what} failed ({e}); "
                                    "set runtime.decode_graphs: off (--decode-graphs off) to decode eagerly, and "
                                    "report this with the backend's op list (`dsv4 backends`)") from e
        return _Recorded(graph, out)


class _Recorded:
    def __init__(self, graph, out):
        self.graph, self.out = graph, out

    def replay(self):
        self.graph.replay()
        return self.out


def native_capture(model) -> GraphCapture | None:
    """The backend's graphs for the model's device (`ops.graph_capture`), or None: the backend
    cannot capture its decode step (`capturable` false) or this device has no graphs."""
    ops = model.ops
    hook = getattr(ops, "graph_capture", None)
    if not getattr(ops, "capturable", False) or hook is None:
        return None
    return hook(model.device)


# ------------------------------------------------------------------ buckets and replay: the core's side
def default_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """Decode steps of `model` over one persistent `cache`, one captured graph per bucket.

    q: tokens per sequence and step. 1 for plain decode (`step`: logits of each sequence's token);
    1 + k under speculative decoding (`verify`: a sequence's newest token and its k drafts, the
    logits of every token, the main stack's streams and the compressors' inputs, which the
    speculative path needs to draft and to take rejected drafts back).

    The cache must keep one slot free for the padding rows (size it max_batch + 1 slots); the
    object takes that slot at construction and holds it for its lifetime.
    """

    def __init__(self, model, cache, max_batch: int, mode: str = "auto", buckets: list[int] | None = None, q: int = 1):
        """mode: "auto" (the backend's graphs for this device, else the emulation), the backend's own
        mode ("cuda", "npu": it must be the one `ops.graph_capture` gives here) or "emulate"."""
        if not getattr(model.ops, "capturable", False):
            raise InputError(f"backend '{model.ops.name}' does not support graph-captured decode "
                             "(set runtime.decode_graphs: off, or use the cuda backend)")
        dev = model.device
        native = native_capture(model)
        if mode == "auto":
            mode = native.mode if native is not None else "emulate"
        if mode == "emulate":
            self.capturer = EmulatedCapture()
        elif native is not None and native.mode == mode:
            self.capturer = native
        else:
            here = f"{native.mode} graphs" if native is not None else "no graphs: only emulate"
            raise InputError(f"graph mode {mode!r}: backend '{model.ops.name}' on {dev} captures {here}; "
                             "use auto, emulate or that mode")
        self.model, self.cache, self.mode, self.q = model, cache, mode, q
        self.buckets = sorted(buckets or default_buckets(max_batch))
        if self.buckets[-1] < max_batch or self.buckets[0] < 1:
            raise InputError(f"graph buckets {self.buckets} must be >= 1 and reach max_batch={max_batch}")
        self.scratch = cache.alloc()
        cache.reserve(self.scratch, q)
        B = self.buckets[-1]
        # cache slots and first positions per sequence, token ids per token; overwritten in place before every replay
        self._buf = torch.zeros(2, B, dtype=torch.long, device=dev)
        self._ids = torch.zeros(B * q, dtype=torch.long, device=dev)
        self._pad()
        self._graphs: dict[int, object] = {}  # bucket -> what the capturer recorded (its replay() gives the outputs)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise InputError(f"a decode step of {n} sequences exceeds the largest captured batch {self.max_batch}; "
                         "raise runtime.max_num_seqs")

    def _pad(self, start: int = 0):
        self._ids[start * self.q:] = 0
        self._buf[0, start:] = self.scratch
        self._buf[1, start:] = 0

    def _forward(self, B: int):
        """The captured step: q = 1 -> logits [B, V]; q > 1 -> (logits [B*q, V], streams [B*q, hc, D],
        the compressors' inputs {(layer, which): (kv, score, ape)})."""
        batch = DecodeBatch(self._buf[0, :B], self._buf[1, :B], self.cache.max_seq_len, self.q)
        ids = self._ids[:B * self.q]
        if self.q == 1:
            logits, _ = self.model.forward(ids, batch, self.cache, logits="last")
            return logits
        self.model.compress_inputs = inputs = {}
        try:
            X = self.model.trunk(ids, batch, self.cache)
        finally:
            self.model.compress_inputs = None
        return self.model.head_logits(X, batch, "all"), X, inputs

    def _capture(self, B: int) -> None:
        """Record bucket B (the backend's capture warms it up first) with every row on the scratch slot."""
        self._pad()
        self._graphs[B] = self.capturer.capture(lambda: self._forward(B), B)

    def capture_all(self) -> None:
        """Capture every bucket now, largest first (they share one memory pool)."""
        for B in reversed(self.buckets):
            if B not in self._graphs:
                self._capture(B)

    def step(self, slots: list[int], positions: list[int], ids: list[int]) -> torch.Tensor:
        """One decode token for each sequence: sequence i (cache slot slots[i]) gets token ids[i] at
        position positions[i]. Returns logits [n, vocab] (a view into the graph's output buffer:
        valid until the next step)."""
        if self.q != 1:
            raise InputError(f"these graphs take {self.q} tokens per sequence: call verify")
        return self._replay(slots, positions, ids)[:len(slots)]

    def verify(self, slots: list[int], positions: list[int], ids: list[int]):
        """q tokens for each sequence: sequence i gets ids[i*q:(i+1)*q] at positions[i] on. Returns
        (logits [n*q, vocab], streams [n*q, hc, D], compressor inputs): views into the graph's
        buffers, valid until the next step."""
        n, q = len(slots), self.q
        logits, X, inputs = self._replay(slots, positions, ids)
        return logits[:n * q], X[:n * q], inputs

    def _replay(self, slots: list[int], positions: list[int], ids: list[int]):
        n, q = len(slots), self.q
        if not n == len(positions) or len(ids) != n * q or n == 0:
            raise InputError(f"decode step: {n} slots, {len(positions)} positions, {len(ids)} token ids; give one "
                             f"slot and position per sequence (at least one) and {q} token id(s) each")
        if self.model.hook is not None:
            raise InputError("a captured decode step records no hooks; detach model.hook "
                             "(or set runtime.decode_graphs: off)")
        V = self.model.cfg.vocab_size
        for t in ids:
            if not 0 <= int(t) < V:
                raise InputError(f"token id {t} is outside the vocabulary [0, {V}) of model '{self.model.cfg.name}'")
        if len(set(slots)) != n or self.scratch in slots:
            raise InputError(f"decode step: cache slots {slots} must be distinct sequences' slots")
        B = self.bucket(n)
        if B not in self._graphs:
            self._capture(B)
        for s, p in zip(slots, positions):
            self.cache.reserve(s, p + q)
        self._buf[:, :n].copy_(torch.tensor([list(slots), list(positions)], dtype=torch.long), non_blocking=False)
        self._ids[:n * q].copy_(torch.tensor(list(ids), dtype=torch.long), non_blocking=False)
        self._pad(n)
        out = self._graphs[B].replay()
        for s, p in zip(slots, positions):
            self.cache.seq_len[s] = p + q
        return out
