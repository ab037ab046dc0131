"""Whole-model decode of bench/cuda_kernels.py: the reference backend, the cuda backend launching
every kernel from Python, and the cuda backend replaying captured CUDA graphs, each through the
engine (`v4.engine.LLM`) on the same device and weights; tokens/s, ratios and agreement."""

from __future__ import annotations

import gc
import statistics
import time
from types import SimpleNamespace

import torch

from cuda_kernels_cases import Ctx
from cuda_kernels_run import log, sync

TARGET_MODEL_RATIO = 5.0  # whole-model decode: cuda tok/s >= 5x reference tok/s on the same GPU


def model_bench(ctx: Ctx) -> dict:
    """Whole-model decode, same device, same weights, each run through the engine (one `v4.engine.LLM`
    per variant over the same prompts): the reference backend, the cuda backend launching every
    kernel from Python ("cuda eager", graphs="off"), and the cuda backend replaying one captured CUDA
    graph per decode step ("cuda graphs", graphs="on" with one bucket of the batch size; emulated in
    --smoke without a GPU).

    Per batch size B: B requests of `--model-context` prompt tokens go into each LLM (max_num_seqs=B,
    a token budget of B x context, so the prefill is one packed step), then the variants take
    decode steps in turn (`LLM.step()`, rotating who goes first). Every variant is fed the
    reference's greedy tokens: after each step the token a variant picked is counted against the
    reference's pick and then replaced by it (the request's last output id), so one near-tie does
    not make the rest of the run disagree and the last step's logits stay comparable."""
    a = ctx.args
    from v4.engine import SamplingParams

    cfg_name = a.model_config or ("tiny" if ctx.smoke else "small")
    dev = str(ctx.dev)
    res = {"config": cfg_name, "device": dev, "rows": [], "notes": []}
    loaded = _load_models(cfg_name, dev, a, res)
    graphs_ok = getattr(loaded["cuda"].model.ops, "capturable", False)
    if not graphs_ok:
        res["notes"].append(
            "the cuda run has reference ops filled in, which cannot be captured: no 'cuda graphs' column"
        )
    res["graph_mode"] = None
    cfg = loaded["reference"].cfg
    res["layers"] = cfg.num_hidden_layers
    ctx_len, steps, warm = a.model_context, a.model_steps, a.model_warmup
    batches = [int(b) for b in a.model_batches.split(",")] if a.model_batches else ([1, 2] if ctx.smoke else [1, 8])
    res.update(context=ctx_len, steps=steps, warmup=warm, dtype=loaded["cuda"].runtime.dtype)
    variants = [("ref", "reference", "off"), ("cuda", "cuda", "off")] + (
        [("graphs", "cuda", "on")] if graphs_ok else []
    )

    g = torch.Generator().manual_seed(a.seed)
    with torch.inference_mode():
        for B in batches:
            ids = torch.randint(2, cfg.vocab_size, (B, ctx_len), generator=g).tolist()
            # prefill's token + one per step + one profiled step (kernels per step)
            params = SamplingParams(max_tokens=warm + steps + 2, ignore_eos=True)
            st = _start_variants(ctx, loaded, variants, B, ids, params, ctx_len + warm + steps + 2, res)
            agree, last, toks = _decode_steps(ctx, st, warm, steps)
            res["rows"].append(_batch_row(ctx, st, B, ctx_len, steps, agree, last, toks, res))
            del st
            gc.collect()
            if ctx.gpu:
                torch.cuda.empty_cache()
    return res


def _load_models(cfg_name: str, dev: str, a, res: dict) -> dict:
    """The model on the reference and on the cuda backend ({backend: LoadedModel}); notes in `res`."""
    from v4 import runtime
    from v4.errors import BackendUnavailable

    loaded = {}
    for backend in ("reference", "cuda"):
        ov = {"backend": backend, "device": dev, "dtype": a.model_dtype}
        t0 = time.perf_counter()
        try:
            L = runtime.load(config=cfg_name, overrides=ov, seed=a.seed, progress=False)
        except BackendUnavailable as e:
            if backend == "reference":
                raise
            ov["allow_fallback"] = True
            L = runtime.load(config=cfg_name, overrides=ov, seed=a.seed, progress=False)
            res["notes"].append(f"cuda backend loaded with runtime.allow_fallback: {e}")
        loaded[backend] = L
        fb = tuple(getattr(L.model.ops, "fallback", ()))
        log(f"model '{cfg_name}' on backend {backend} ({dev}"
            + (f"; from reference: {', '.join(fb)}" if fb else "")
            + f"), dtype {L.runtime.dtype}, mode {L.runtime.mode}, loaded in {time.perf_counter() - t0:.1f}s")
    fb = tuple(getattr(loaded["cuda"].model.ops, "fallback", ()))
    res["cuda_fallback_ops"] = list(fb)
    if fb:
        res["notes"].append(f"ops of the cuda run that came from the reference backend: {', '.join(fb)}")
    return loaded


def _rows_of(s) -> list[int]:
    """Batch row of each of the variant's requests (in s.rids order) in the last step's logits."""
    order = [rid for rid, _, _ in s.llm.last_step.scheduled]
    return [order.index(r) for r in s.rids]


def _step(ctx: Ctx, s):
    """One engine step; returns (logits [B, V] in request order, greedy picks in request order, seconds)."""
    sync(ctx)
    t0 = time.perf_counter()
    outs = s.llm.step()  # the sampler's greedy pick and its .tolist() are in the step (and sync)
    sync(ctx)
    dt = time.perf_counter() - t0
    picked = {o.request_id: o.new_token_ids[0] for o in outs if o.new_token_ids}
    if sorted(picked) != sorted(s.rids):
        raise RuntimeError(f"an engine step gave tokens for requests {sorted(picked)}, expected {sorted(s.rids)}")
    return s.llm.last_step.logits[_rows_of(s)], [picked[r] for r in s.rids], dt


def _force(s, toks) -> None:
    """Feed the reference's tokens: replace each request's last pick before the next step."""
    for seq, t in zip(s.seqs, toks):
        seq.output_ids[-1] = t


def _start_variants(ctx: Ctx, loaded: dict, variants: list, B: int, ids: list, params, max_model_len: int,
                    res: dict) -> dict:
    """One LLM per variant with the B prompts added and prefilled (one packed step), graphs captured;
    every variant is then fed the reference's first tokens. Returns {variant: state}."""
    from v4.config import RuntimeConfig
    from v4.engine import LLM

    st = {}
    for key, backend, graphs in variants:
        m = loaded[backend].model
        rt = RuntimeConfig(max_num_seqs=B, max_num_batched_tokens=B * len(ids[0]), max_model_len=max_model_len)
        llm = LLM(m, rt, graphs=graphs, buckets=[B] if graphs == "on" else None)
        if graphs == "on":
            res["graph_mode"] = llm.runner.graph_mode
        s = SimpleNamespace(llm=llm, rids=[llm.add_request(p, params) for p in ids], times=[])
        s.seqs = [llm.sequence(r) for r in s.rids]  # (the engine lets go of a request once it finishes)
        first, picks, s.prefill_s = _step(ctx, s)  # the whole prefill is one packed step
        s.first = (first, picks)
        s.capture_s = 0.0
        if llm.runner.graphs is not None:
            t0 = time.perf_counter()
            llm.runner.graphs.capture_all()  # warm-up (Triton JIT) + capture, outside the timed steps
            sync(ctx)
            s.capture_s = time.perf_counter() - t0
        st[key] = s
    toks = st["ref"].first[1]
    for key, s in st.items():
        _force(s, toks)
    return st


def _decode_steps(ctx: Ctx, st: dict, warm: int, steps: int) -> tuple[dict, dict, list]:
    """warm + steps decode steps of every variant in turn (rotating who goes first), each fed the
    reference's picks. Returns (greedy agreements with the reference per variant, the last step's
    max |logit difference| per variant and its scale, the reference's last picks)."""
    agree = {k: 0 for k in st if k != "ref"}
    last = {}
    toks = st["ref"].first[1]
    for i in range(warm + steps):
        keys = list(st)
        keys = keys[i % len(keys):] + keys[:i % len(keys)]  # rotate who goes first
        outs = {}
        for key in keys:
            s = st[key]
            o, nl, dt = _step(ctx, s)
            outs[key] = (o.double().cpu() if i == warm + steps - 1 else None, nl)
            if i >= warm:
                s.times.append(dt)
        for k in agree:
            if i >= warm:
                agree[k] += sum(x == y for x, y in zip(outs[k][1], outs["ref"][1]))
        toks = outs["ref"][1]  # every variant is fed the reference's greedy tokens
        if i < warm + steps - 1:
            for key, s in st.items():
                _force(s, toks)
        else:
            orf = outs["ref"][0]
            last = {k: float((outs[k][0] - orf).abs().max()) for k in agree}
            last["scale"] = float(orf.abs().max())
    return agree, last, toks


def _batch_row(ctx: Ctx, st: dict, B: int, ctx_len: int, steps: int, agree: dict, last: dict, toks: list,
               res: dict) -> dict:
    """The result row of one batch size (one more step per variant: profiled on a GPU for the
    kernels per step)."""
    row = {"batch": B, "context": ctx_len}
    if ctx.gpu:
        for key, s in st.items():
            _force(s, toks)
            try:
                row[f"{key}_kernels"] = kernels_in_step(lambda s=s: _step(ctx, s))
            except Exception as e:  # noqa: BLE001 - the count is a diagnostic, not the benchmark
                res["notes"].append(f"kernel count of {key} failed: {type(e).__name__}: {e}")
    else:
        for s in st.values():
            _step(ctx, s)
    for key, s in st.items():
        if s.llm.has_unfinished():
            res["notes"].append(f"batch {B}, {key}: requests still unfinished after the timed steps (a bench bug)")
        med = statistics.median(s.times)
        row[f"{key}_ms"] = med * 1e3
        row[f"{key}_tok_s"] = B / med
        row[f"{key}_prefill_s"] = s.prefill_s
        row[f"{key}_preemptions"] = s.llm.stats.num_preemptions
    if "graphs" in st:
        row["graphs_capture_s"] = st["graphs"].capture_s
    for k in agree:
        row[f"{k}_ratio"] = row[f"{k}_tok_s"] / row["ref_tok_s"]
        row[f"{k}_agree"] = agree[k]
        row[f"{k}_last_logits_max_abs_diff"] = last[k]
    row.update(agree_of=steps * B, last_logits_max_abs=last["scale"])
    return row


def kernels_in_step(fn) -> int:
    """GPU kernels one call of fn launches (torch.profiler / CUPTI; kernels inside a replayed CUDA
    graph are counted one by one), memcpy / memset excluded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not any(
            w in e.name.lower() for w in ("memcpy", "memset")
        ):
            n += 1
    return n


def report_model(ctx: Ctx, res: dict) -> None:
    log("")
    log(
        f"whole-model decode: config '{res['config']}', {res['dtype']}, device {res['device']}, prefill "
        f"{res['context']} tokens per sequence, then {res['steps']} timed single-token steps after {res['warmup']} "
        "warm-up (median ms/step of LLM.step(), wall clock incl. scheduling, "
        "the host's step bookkeeping and the greedy pick; 'graphs' = "
        f"the cuda backend replaying captured CUDA graphs"
        + (
            ", emulated here: no GPU, so the same static-buffer path runs eagerly under HostSyncGuard"
            if res.get("graph_mode") == "emulate"
            else ""
        )
        + "; ratios are against the reference backend on the same device, "
        "agreement = greedy picks equal to the reference's)"
    )
    cols = [k for k in ("cuda", "graphs") if any(f"{k}_ms" in r for r in res["rows"])]
    hdr = (
        f"{'batch':>5} | {'ref ms':>8} | "
        + " | ".join(f"{k + ' ms':>10} {'x ref':>6} {'agree':>9} {'|dlogit|':>9}" for k in cols)
        + f" | target: graphs >={TARGET_MODEL_RATIO:g}x ref"
    )
    log(hdr)
    log("-" * len(hdr))
    for r in res["rows"]:
        line = f"{r['batch']:>5} | {r['ref_ms']:8.2f} | " + " | ".join(
            f"{r[k + '_ms']:10.2f} {r[k + '_ratio']:5.2f}x {r[k + '_agree']:>4}/{r['agree_of']:<4} "
            f"{r[k + '_last_logits_max_abs_diff']:9.2e}" for k in cols)
        key = "graphs_ratio" if "graphs_ratio" in r else "cuda_ratio"
        verdict = "(smoke)" if ctx.smoke else ("PASS" if r[key] >= TARGET_MODEL_RATIO else "MISS")
        line += f" | {verdict}"
        if "graphs_capture_s" in r:
            line += f" (capture {r['graphs_capture_s']:.2f}s)"
        kern = r.get("cuda_kernels")
        if kern:
            line += (
                f" | kernels/step {kern} ({kern / res['layers']:.1f}/layer; graphs {r.get('graphs_kernels', '-')}, "
                f"ref {r.get('ref_kernels', '-')}), eager {r['cuda_ms'] * 1e3 / kern:.1f} us/kernel"
            )
        log(line)
    for n in res["notes"]:
        log(f"note: {n}")
