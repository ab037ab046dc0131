"""LLM: the engine's front. Requests join with `add_request` and leave when they finish or are
aborted; every `step()` schedules one packed model step and reports only what is new.

    llm = LLM(model, runtime, tokenizer)
    rid = llm.add_request(prompt_ids, SamplingParams(max_tokens=32))
    while llm.has_unfinished():
        for out in llm.step(): ...   # RequestOutput(request_id, new_token_ids, new_text, logprobs, finished, ...)

`generate(prompts, params)` is that loop, for offline use (`dsv4 generate`, parity, the benches).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from ..config import RuntimeConfig
from ..errors import ConfigError, InputError
from ..model import Transformer
from .block_manager import BlockManager
from .runner import ModelRunner
from .sampler import Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledSeq, Scheduler
from .spec_decode import MTPDrafter, Verified
from .sequence import FinishReason, RequestOutput, Sequence, TokenLogprobs


@dataclass
class Completion:
    """A finished request, as `generate` returns it."""

    request_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class EngineStats:
    """Counters since start-up (vLLM's metric names in brackets)."""

    prompt_tokens: int = 0  # [vllm:prompt_tokens_total] prompt tokens of requests whose prefill completed
    generation_tokens: int = 0  # [vllm:generation_tokens_total]
    num_preemptions: int = 0  # [vllm:num_preemptions_total]
    steps: int = 0
    prefill_s: float = 0.0  # wall time of steps that computed prompt tokens
    decode_s: float = 0.0  # wall time of decode-only steps
    prefill_tokens: int = 0  # tokens computed in the former (recomputation included)
    decode_tokens: int = (
        0  # tokens generated in the latter (with speculative decoding: accepted drafts + 1 per verification)
    )
    decode_steps: int = 0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["prefill_tok_per_s"] = self.prefill_tokens / self.prefill_s if self.prefill_s else None
        d["decode_tok_per_s"] = self.decode_tokens / self.decode_s if self.decode_s else None
        return d


@dataclass
class StepRecord:
    """What the last step ran, for callers that look inside (parity record): the scheduled
    (request id, first position, token count) in batch order, and the logits it returned."""

    scheduled: list[tuple[int, int, int]]
    logits: torch.Tensor
    offsets: list[int] = field(default_factory=list)  # batch row of each scheduled sequence's first token
    drafts: list[int] = field(default_factory=list)  # speculative drafts among each sequence's tokens


class LLM:
    def __init__(self, model: Transformer, runtime: RuntimeConfig | None = None, tokenizer=None, *,
                 graphs: str | None = None, buckets: list[int] | None = None, logits: str = "last",
                 runner: ModelRunner | None = None):
        """runtime: max_num_seqs, max_num_batched_tokens, max_model_len, kv_cache_memory, block_size,
        prefill_chunk and cuda_graphs (`graphs` overrides the last). logits="all" keeps every
        position's logits in `last_step` (parity); "last" computes only the rows that sample.
        runner: a runner built by the caller (a multi-device run's `v4.dist.runner.TPRunner`)."""
        rt = runtime or RuntimeConfig()
        self.model, self.runtime, self.tokenizer = model, rt, tokenizer
        self.runner = runner if runner is not None else ModelRunner(model, rt, graphs, buckets)
        self.blocks = BlockManager(self.runner.cache, self.runner.reserved_slots)
        self.scheduler = Scheduler(self.blocks, rt.max_num_seqs, rt.max_num_batched_tokens, rt.prefill_chunk)
        self.sampler = Sampler(model.cfg.eos_token_id)
        self.drafter = self._drafter(rt)
        self.logits_mode = logits
        self.stats = EngineStats()
        self.last_step: StepRecord | None = None
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self._pending: list[RequestOutput] = []  # finished outside a step (max_tokens=0, abort)

    def _drafter(self, rt: RuntimeConfig):
        """The MTP drafter when runtime.speculative_config is set, else None."""
        spec = rt.speculative
        if spec is None:
            return None
        if rt.tensor_parallel_size * rt.data_parallel_size > 1 or type(self.runner) is not ModelRunner:
            raise ConfigError("runtime.speculative_config: speculative decoding runs on one device for now; "
                              "drop --speculative-config or run with -tp 1 -dp 1")
        return MTPDrafter(self.model, self.runner, self.sampler, spec)

    @property
    def graph_mode(self) -> str:
        return self.runner.graph_mode

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. A request that can never run is refused here with one
        sentence (InputError), and the engine goes on serving the others."""
        return self._add(prompt_ids, params).id

    def validate(self, prompt_ids, params: SamplingParams | None) -> tuple[list[int], SamplingParams]:
        """The checks `add_request` makes, without queueing: InputError (one sentence) if the request
        can never run here."""
        params = params or SamplingParams()
        cfg, rt = self.model.cfg, self.runtime
        prompt_ids = [int(t) for t in prompt_ids]
        cfg.check_token_ids(prompt_ids)
        params.validate(cfg.vocab_size)
        if params.stop and self.tokenizer is None:
            raise InputError(
                "stop strings need a tokenizer to match the text; give the engine one, or use stop_token_ids"
            )
        need = len(prompt_ids) + params.max_tokens
        if need > rt.max_model_len:
            raise InputError(
                f"This model's maximum context length is {rt.max_model_len} tokens, but the request needs {need} "
                f"({len(prompt_ids)} in the prompt, {params.max_tokens} in max_tokens); shorten the prompt, lower "
                "max_tokens or raise runtime.max_model_len"
            )
        why = self.blocks.fits_at_all(need)
        if why:
            raise InputError(f"a request of {need} tokens (prompt + max_tokens) {why}")
        return prompt_ids, params

    def _add(self, prompt_ids, params: SamplingParams | None) -> Sequence:
        prompt_ids, params = self.validate(prompt_ids, params)
        seq = Sequence(next(self._ids), prompt_ids, params)
        self._seqs[seq.id] = seq
        if params.max_tokens == 0:
            self._finish(seq, FinishReason.LENGTH)
            self._pending.append(
                RequestOutput(seq.id, [], "", [] if params.logprobs is not None else None, True, "length")
            )
        else:
            self.scheduler.add(seq)
        return seq

    def abort(self, request_id: int) -> bool:
        """Stop a request now and give its memory back; its last output (finish_reason "abort")
        comes with the next step. False if it had already finished."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.is_finished:
            return False
        self._finish(seq, FinishReason.ABORT)
        self._pending.append(RequestOutput(seq.id, [], "", None, True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def sequence(self, request_id: int) -> Sequence:
        """A request that has not finished yet (the engine lets go of finished ones)."""
        return self._seqs[request_id]

    def kv_cache_usage(self) -> float:
        return self.blocks.usage()

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        step = self.scheduler.schedule()
        self.stats.num_preemptions = self.scheduler.num_preemptions
        if not step:
            if self.scheduler.running or self.scheduler.waiting and not outputs:
                raise RuntimeError(f"the scheduler placed nothing with {len(self.scheduler.waiting)} waiting and "
                                   f"{len(self.scheduler.running)} running sequences (an engine bug)")
            return outputs
        t0 = time.perf_counter()
        now = time.monotonic()
        for s in step:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        if self.drafter is not None:
            logits, verified, kept = self.drafter.run(step, self.logits_mode)
        else:
            logits, verified = self._run(step)
            kept = [s.num_tokens for s in step]
        offsets = [sum(s.num_tokens for s in step[:b]) for b in range(len(step))]  # each sequence's first row
        self.last_step = StepRecord([(s.seq.id, s.start, s.num_tokens) for s in step], logits, offsets,
                                    [s.num_drafts for s in step])
        for s, n in zip(step, kept):
            s.seq.num_computed = self.runner.cache.seq_len[s.seq.slot] = s.start + n
        generated = self.stats.generation_tokens
        for b, v in verified.items():
            outputs.append(self._append_all(step[b].seq, v.tokens, v.logprobs))
        if self.drafter is not None:
            self.drafter.propose(step, kept)
        self._account(step, time.perf_counter() - t0, self.stats.generation_tokens - generated)
        return outputs

    def _run(self, step: list[ScheduledSeq]):
        """One plain step: (its logits, {batch row: Verified} of a token for each sampling sequence)."""
        logits = self.runner.run(step, self.logits_mode)
        last = logits
        if self.logits_mode == "all" and self.runner.last_batch is not None:
            last = logits[self.runner.last_batch.last_token]
        sampling = [b for b, s in enumerate(step) if s.samples]
        tokens, logprobs = self.sampler(last[sampling], [step[b].seq for b in sampling]) if sampling else ([], [])
        return logits, {b: Verified([t], [lp]) for b, t, lp in zip(sampling, tokens, logprobs)}

    def _account(self, step: list[ScheduledSeq], seconds: float, generated: int) -> None:
        """generated: tokens the step appended (a speculative step computes more tokens than it keeps:
        decode speed counts what it generated)."""
        st = self.stats
        st.steps += 1
        if any(s.start < s.seq.num_prompt_tokens for s in step):
            st.prefill_s += seconds
            st.prefill_tokens += sum(s.num_tokens for s in step)
        else:
            st.decode_s += seconds
            st.decode_tokens += generated
            st.decode_steps += 1

    def _append_all(self, seq: Sequence, tokens: list[int], lps: list[TokenLogprobs | None]) -> RequestOutput:
        """Append a step's tokens one by one (a verified speculative step brings several) and merge
        their outputs; tokens after the one that finishes the request are dropped."""
        outs = []
        for tok, lp in zip(tokens, lps):
            outs.append(self._append(seq, tok, lp))
            if outs[-1].finished:
                break
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        lp = [x for o in outs for x in o.logprobs] if last.logprobs is not None else None
        return RequestOutput(seq.id, [t for o in outs for t in o.new_token_ids], "".join(o.new_text for o in outs), lp,
                             last.finished, last.finish_reason, outs[0].queue_s)

    def _append(self, seq: Sequence, token: int, lp: TokenLogprobs | None) -> RequestOutput:
        p = seq.params
        queue_s = None
        if not seq.output_ids:
            seq.first_token_time = time.monotonic()
            self.stats.prompt_tokens += seq.num_prompt_tokens
            queue_s = seq.first_scheduled_time - seq.arrival_time
        self.stats.generation_tokens += 1
        seq.output_ids.append(token)
        reason = None
        if len(seq.output_ids) > p.min_tokens:  # (the sampler kept EOS and stop ids out until then)
            if token == self.sampler.eos and not p.ignore_eos or token in p.stop_token_ids:
                reason = FinishReason.STOP
        new_text, hit = "", False
        if self.tokenizer is not None:
            new_text, hit = self._detokenize(seq, stop_allowed=len(seq.output_ids) >= p.min_tokens)
            reason = reason or (FinishReason.STOP if hit else None)
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
            if self.tokenizer is not None and not hit:
                seq.text += self._text_delta(seq, final=True)  # bytes of an unfinished character, as U+FFFD
            new_text += self._flush_text(seq)
        return RequestOutput(seq.id, [token], new_text, [lp] if lp is not None else None, reason is not None,
                             reason.value if reason else None, queue_s)

    # ------------------------------------------------------------------ text and stop strings
    def _detokenize(self, seq: Sequence, stop_allowed: bool) -> tuple[str, bool]:
        """New text to emit, and whether a stop string ended the output. The text is cut before the
        stop string; the tail that could still grow into one is held back until it cannot."""
        before = len(seq.text)
        seq.text += self._text_delta(seq)
        stops = seq.params.stop
        if stops and stop_allowed:
            look = max(0, before - max(len(x) for x in stops) + 1)  # a new stop string ends in the new text
            hits = [i for i in (seq.text.find(x, look) for x in stops) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                return "", True
        safe = len(seq.text) - (max((len(x) for x in stops), default=1) - 1)
        if safe <= seq.emitted_chars:
            return "", False
        new, seq.emitted_chars = seq.text[seq.emitted_chars:safe], safe
        return new, False

    def _text_delta(self, seq: Sequence, final: bool = False) -> str:
        """Text the newest token adds. Decoding only from a few tokens back keeps this O(1) per token
        (a tokenizer may merge or space a token by its neighbours); a tail that decodes to U+FFFD
        is a character whose bytes have not all come yet, and waits (unless this is the last token)."""
        ids, tok = seq.output_ids, self.tokenizer
        old = tok.decode(ids[seq.prefix_offset:seq.read_offset])
        new = tok.decode(ids[seq.prefix_offset:])
        if len(new) <= len(old) or (new.endswith("\ufffd") and not final):
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return new[len(old):]

    def _flush_text(self, seq: Sequence) -> str:
        new, seq.emitted_chars = seq.text[seq.emitted_chars:], len(seq.text)
        return new

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        del self._seqs[seq.id]  # its last RequestOutput carries what the caller still needs

    # ------------------------------------------------------------------ offline
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[Completion]:
        """Run every prompt to completion (continuous batching) and return them in prompt order."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise InputError(
                f"{len(prompts)} prompts but {len(plist)} sampling parameter sets; give one, or one per prompt"
            )
        seqs: list[Sequence] = []
        try:
            for p, sp in zip(prompts, plist):
                seqs.append(self._add(p, sp))
        except InputError as e:  # all or nothing: take back the prompts queued before the refused one
            for s in seqs:
                if not s.is_finished:
                    self._finish(s, FinishReason.ABORT)
            mine = {s.id for s in seqs}
            self._pending = [o for o in self._pending if o.request_id not in mine]
            raise InputError(f"prompt {len(seqs)}: {e}" if len(prompts) > 1 else str(e)) from None
        lps: dict[int, list] = {s.id: [] for s in seqs}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="requests", unit="req")
        while self.has_unfinished():
            for out in self.step():
                if out.logprobs:
                    lps[out.request_id].extend(out.logprobs)
                if out.finished and bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [Completion(s.id, s.prompt_ids, s.output_ids, s.text, s.finish_reason.value,
                           lps[s.id] if s.params.logprobs is not None else None) for s in seqs]
