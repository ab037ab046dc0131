"""Generation engine: batched variable-length prefill (optionally chunked) and batched decode."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import InputError
from .model import StepBatch, Transformer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop_at_eos: bool = True

    def validate(self):
        if self.temperature < 0:
            raise InputError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"--top-k must be >= 0, got {self.top_k}")


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if p.temperature == 0:
        return logits.argmax(-1)
    x = logits.float() / p.temperature
    if p.top_k:
        kth = x.topk(min(p.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1:
        sx, si = x.sort(-1, descending=True)
        probs = sx.softmax(-1)
        # drop a token once the mass strictly before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        sx = sx.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, si, sx)
    probs = x.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).view(-1).to(logits.device)


@dataclass
class Result:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    decode_steps: int = 0

    def as_dict(self):
        d = dict(self.__dict__)
        d["prefill_tok_per_s"] = self.prefill_tokens / self.prefill_s if self.prefill_s else None
        d["decode_tok_per_s"] = self.decode_tokens / self.decode_s if self.decode_s else None
        return d


DECODE_LABEL = {"off": "eager", "cuda": "cuda graphs", "emulate": "graph path, emulated"}


def graph_mode(setting: str, model: Transformer) -> str:
    """runtime.cuda_graphs (auto | on | off) -> how decode runs: "off" (eager), "cuda" (captured CUDA
    graphs) or "emulate" (the captured path's static buffers and checks, run eagerly: no GPU here)."""
    capturable = getattr(model.ops, "capturable", False)
    if setting == "off" or (setting == "auto" and not (capturable and model.device.type == "cuda")):
        return "off"
    if setting not in ("auto", "on"):
        raise InputError(f"runtime.cuda_graphs must be auto, on or off, got {setting!r}")
    if not capturable:
        raise InputError(f"runtime.cuda_graphs is on, but backend '{model.ops.name}' cannot capture its decode step "
                         "(only the cuda backend can); set it to auto or off")
    return "cuda" if model.device.type == "cuda" else "emulate"


class Engine:
    """Batched generation. graphs: runtime.cuda_graphs (auto | on | off), see `graph_mode`; with
    graphs, every wave decodes in one persistent cache (max_batch sequences of max_seq_len tokens,
    plus the padding slot) that the captured steps are bound to."""

    def __init__(self, model: Transformer, max_batch: int = 8, max_seq_len: int = 4096, block_size: int = 64,
                 prefill_chunk: int = 0, graphs: str = "off"):
        self.model = model
        self.max_batch, self.max_seq_len, self.block_size = max_batch, max_seq_len, block_size
        self.prefill_chunk = prefill_chunk
        self.timings = Timings()
        self.graph_mode = graph_mode(graphs, model)
        self._graphs = None  # DecodeGraphs over the persistent cache, made on first use

    def _decode_graphs(self):
        if self._graphs is None:
            from .graphs import DecodeGraphs

            cache = self.model.new_cache(self.max_batch + 1, self.max_seq_len, self.block_size)
            self._graphs = DecodeGraphs(self.model, cache, self.max_batch, self.graph_mode)
        return self._graphs

    def _check_prompt(self, ids, max_new):
        cfg = self.model.cfg
        if len(ids) == 0:
            raise InputError("empty prompt: give at least one token")
        bad = [t for t in ids if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size}) of model '{cfg.name}'")
        if len(ids) + max_new > self.max_seq_len:
            raise InputError(f"prompt of {len(ids)} tokens + {max_new} new tokens exceeds max_seq_len={self.max_seq_len}; raise runtime.max_seq_len")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams | None = None) -> list[Result]:
        params = params or SamplingParams()
        params.validate()
        if max_new_tokens < 0:
            raise InputError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        for ids in prompts:
            self._check_prompt(ids, max_new_tokens)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        results = []
        for s in range(0, len(prompts), self.max_batch):
            results += self._run_wave(prompts[s:s + self.max_batch], max_new_tokens, params, gen)
        return results

    def _run_wave(self, prompts, max_new, params, gen):
        if self.graph_mode == "off":
            cache = self.model.new_cache(len(prompts), max(len(p) for p in prompts) + max_new + 1, self.block_size)
            return self._wave(cache, [cache.alloc() for _ in prompts], prompts, max_new, params, gen)
        graphs = self._decode_graphs()
        slots = [graphs.cache.alloc() for _ in prompts]
        try:
            return self._wave(graphs.cache, slots, prompts, max_new, params, gen, graphs)
        finally:
            for s in slots:
                graphs.cache.release(s)

    def _wave(self, cache, slots, prompts, max_new, params, gen, graphs=None):
        m = self.model
        dev = m.device
        results = [Result(list(map(int, p))) for p in prompts]
        # prefill (chunked when prefill_chunk > 0): every sequence advances in the same packed steps
        t0 = time.perf_counter()
        done = [0] * len(prompts)
        last_logits = [None] * len(prompts)
        chunk = self.prefill_chunk or max(len(p) for p in prompts)
        while any(d < len(p) for d, p in zip(done, prompts)):
            rows = [i for i, p in enumerate(prompts) if done[i] < len(p)]
            lens = [min(chunk, len(prompts[i]) - done[i]) for i in rows]
            ids = torch.tensor([t for i, n in zip(rows, lens) for t in prompts[i][done[i]:done[i] + n]], device=dev)
            batch = StepBatch([slots[i] for i in rows], [done[i] for i in rows], lens, dev)
            logits, _ = m.forward(ids, batch, cache, logits="last")
            for r, i in enumerate(rows):
                done[i] += lens[r]
                if done[i] == len(prompts[i]):
                    last_logits[i] = logits[r]
        self.timings.prefill_s += time.perf_counter() - t0
        self.timings.prefill_tokens += sum(len(p) for p in prompts)
        if max_new == 0:
            return results
        # decode
        t0 = time.perf_counter()
        active = list(range(len(prompts)))
        nxt = sample(torch.stack(last_logits), params, gen)
        eos = m.cfg.eos_token_id
        while True:
            still = []
            for r, i in enumerate(active):
                tok = int(nxt[r])
                results[i].output_ids.append(tok)
                if params.stop_at_eos and tok == eos:
                    results[i].finish_reason = "eos"
                elif len(results[i].output_ids) < max_new:
                    still.append((i, tok))
            if not still:
                break
            active = [i for i, _ in still]
            starts = [len(prompts[i]) + len(results[i].output_ids) - 1 for i in active]
            if graphs is not None:
                logits = graphs.step([slots[i] for i in active], starts, [t for _, t in still])
            else:
                ids = torch.tensor([t for _, t in still], device=dev)
                batch = StepBatch([slots[i] for i in active], starts, [1] * len(active), dev)
                logits, _ = m.forward(ids, batch, cache, logits="last")
            self.timings.decode_steps += 1
            self.timings.decode_tokens += len(active)
            nxt = sample(logits, params, gen)
        self.timings.decode_s += time.perf_counter() - t0
        return results
