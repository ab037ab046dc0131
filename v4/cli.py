"""`dsv4` command line: init, info, backends, generate, serve (and parity)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings

from .errors import DSV4Error, InputError

USAGE_EXAMPLES = """examples:
  dsv4 generate --prompt "def main(" --max-new-tokens 16     # the shipped trained tiny-v4 (the default model)
  dsv4 generate --config tiny --prompt "Hello" --max-new-tokens 16   # random weights
  dsv4 init --config tiny --out /tmp/tiny-ckpt --quant fp8
  dsv4 info --config v4-flash
  dsv4 backends
  dsv4 serve --port 8000                              # tiny-v4; --config tiny for random weights
  dsv4 serve --config tiny -tp 2 --enable-expert-parallel
  dsv4 plan --deploy a3-flash-w8a8-dp4-tp4-ep --context 1M
"""


def _add_model_args(p):
    from .runtime import add_runtime_flags

    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--checkpoint",
        help="checkpoint directory (config.json + *.safetensors); default, when neither "
        "--checkpoint nor --config is given: the trained tiny-v4 shipped in the package (v4/embedded/tiny-v4)",
    )
    g.add_argument("--config", help="model config with seeded random weights: tiny, small, v4-flash, v4-pro, tiny-v4 "
                   "(the trained model's architecture, random weights), or a YAML / config.json path")
    p.add_argument("--runtime", help="runtime YAML (configs/cpu.yaml, ...); overrides the model file's runtime section")
    p.add_argument(
        "--backend",
        choices=["auto", "reference", "cuda", "ascend"],
        help="overrides runtime.backend (DSV4_BACKEND overrides this)",
    )
    p.add_argument("--device", help="torch device, e.g. cpu, cuda:0")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument(
        "--mode",
        choices=["plain", "exact"],
        help="numerics: plain (the math) or exact (official run-time quantisation)",
    )
    add_runtime_flags(p, "overrides runtime.decode_graphs: decode steps replayed from graphs the backend captures "
                      "(CUDA graphs on cuda, ACL graphs on ascend); auto: where the backend's device has them; on "
                      "elsewhere runs the captured path's checks eagerly")
    p.add_argument("--seed-weights", type=int, default=None,
                   help="seed of the random weights used with --config (default 0); a checkpoint's weights are fixed")
    p.set_defaults(pick_model=True)


def pick_model(a) -> None:
    """Neither --checkpoint nor --config: the shipped trained tiny-v4 checkpoint, said on stderr
    (one line) so nobody mistakes it for random weights or the reverse."""
    from .runtime import DEFAULT_CHECKPOINT, DEFAULT_MODEL_NOTE

    if a.seed_weights is not None and a.config is None:
        raise InputError("--seed-weights applies to --config (seeded random weights) only; a checkpoint's weights "
                         "are fixed: drop it or add --config NAME")
    if a.seed_weights is None:
        a.seed_weights = 0
    if a.checkpoint is None and a.config is None:
        a.checkpoint = str(DEFAULT_CHECKPOINT)
        if hasattr(a, "served_model_name") and a.served_model_name is None:
            a.served_model_name = DEFAULT_CHECKPOINT.name  # clients send "tiny-v4", not a path inside site-packages
        print(f"dsv4: {DEFAULT_MODEL_NOTE}", file=sys.stderr)


def _add_engine_args(p):
    g = p.add_argument_group("engine (runtime fields, vLLM's flag names)")
    g.add_argument("--max-num-seqs", type=int, help="overrides runtime.max_num_seqs: sequences running at once")
    g.add_argument(
        "--max-num-batched-tokens", type=int, help="overrides runtime.max_num_batched_tokens: tokens per step"
    )
    g.add_argument(
        "--max-model-len", type=int, help="overrides runtime.max_model_len: prompt + generated tokens of one request"
    )
    g.add_argument("--kv-cache-memory", help="overrides runtime.kv_cache_memory: the cache's byte budget, e.g. 2GiB")
    g.add_argument(
        "--block-size", type=int, help="overrides runtime.block_size: entries per page of the compressed pools"
    )
    g.add_argument(
        "--speculative-config",
        help="overrides runtime.speculative_config: MTP speculative decoding, "
        "e.g. '{\"method\": \"mtp\", \"num_speculative_tokens\": 2}' (k from 1 to 3; README \"Speculative decoding\")",
    )
    d = p.add_argument_group("multi-device (README \"Multi-device\"; ranks = TP x DP, one process per device)")
    d.add_argument(
        "-tp",
        "--tensor-parallel-size",
        type=int,
        help="overrides runtime.tensor_parallel_size: query heads, "
        "wo_a groups, vocab (and experts' intermediate dim without EP) split over this many ranks",
    )
    d.add_argument(
        "-dp",
        "--data-parallel-size",
        type=int,
        help="overrides runtime.data_parallel_size: replicas of attention, each with its own requests and KV cache",
    )
    d.add_argument("--enable-expert-parallel", action="store_true", default=None,
                   help="routed experts split over all TP x DP ranks (runtime.enable_expert_parallel)")
    d.add_argument("--moe-comm", choices=["alltoall", "allgather"], help="overrides runtime.moe_comm: expert dispatch")
    d.add_argument("--dist-timeout", dest="dist_timeout_s", type=float,
                   help="overrides runtime.dist_timeout_s: seconds before a silent rank counts as dead")


def _overrides(a):
    from .runtime import runtime_flag_overrides

    keys = ("backend", "device", "dtype", "mode", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
            "kv_cache_memory", "block_size", "tensor_parallel_size", "data_parallel_size", "enable_expert_parallel",
            "moe_comm", "dist_timeout_s", "speculative_config")
    return {**{k: getattr(a, k, None) for k in keys}, **runtime_flag_overrides(a)}


def _generate_prompts(a, tokenizer) -> list[list[int]]:
    """The prompts of `dsv4 generate` as token ids (--ids, or each --prompt encoded)."""
    if a.ids is not None:
        try:
            return [[int(x) for x in a.ids.split(",") if x.strip() != ""]]
        except ValueError:
            raise InputError(f"--ids must be comma-separated integers, got {a.ids!r}") from None
    return [tokenizer.encode(p) for p in a.prompt]


def _sampling_params(a, vocab_size: int):
    """SamplingParams from the flags, validated; errors name the flag."""
    from .engine import SamplingParams

    params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, seed=a.seed,
                            max_tokens=a.max_new_tokens, min_tokens=a.min_tokens, stop=a.stop or [],
                            stop_token_ids=a.stop_token_ids or [], ignore_eos=a.ignore_eos, logprobs=a.logprobs)
    try:
        params.validate(vocab_size)
    except InputError as e:  # the messages start with the parameter's name: give the flag's instead
        name, rest = str(e).split(" ", 1)
        raise InputError(f"--{name.replace('_', '-')} {rest}") from None
    return params


def _print_generate_summary(L, llm, prompts, results, load_s: float, t: dict) -> None:
    """The stderr summary of a text-mode `dsv4 generate`."""
    print(llm.runner.cache_summary, file=sys.stderr)
    n_out = sum(len(r.output_ids) for r in results)
    reasons = ", ".join(sorted({r.finish_reason for r in results}))
    print(f"[{L.cfg.name} on {L.model.ops.name}/{L.runtime.dtype}/{L.runtime.mode}: {len(prompts)} prompt(s), "
          f"{sum(map(len, prompts))} prompt tokens, {n_out} generated ({reasons}); load {load_s:.2f}s, "
          f"prefill {t['prefill_s']:.3f}s, decode {t['decode_tok_per_s'] or 0:.1f} tok/s, "
          f"{t['num_preemptions']} preemptions]", file=sys.stderr)
    spec = _spec_summary(llm)
    if spec is not None:
        print(f"[speculative: k={spec['num_speculative_tokens']}, {spec['num_drafts']} verifications, mean acceptance "
              f"length {spec['mean_acceptance_length'] or 0:.2f}, acceptance per position "
              f"{', '.join(f'{x:.2f}' for x in spec['acceptance_rate_per_pos'])}]", file=sys.stderr)


def cmd_generate(a) -> int:
    import dataclasses

    from .engine import DECODE_LABEL, LLM
    from .runtime import load

    if (a.prompt is None) == (a.ids is None):
        raise InputError("give exactly one of --prompt TEXT (repeatable) or --ids 1,2,3")
    t0 = time.perf_counter()
    ctx = _start_ranks(a, progress=not a.json)
    if ctx is not None and ctx.rank != 0:
        return ctx.follow()
    L = ctx.loaded if ctx is not None else load(a.checkpoint, a.config, a.runtime, _overrides(a), seed=a.seed_weights,
                                                progress=not a.json)
    load_s = time.perf_counter() - t0
    prompts = _generate_prompts(a, L.tokenizer)
    params = _sampling_params(a, L.cfg.vocab_size)
    # the cache is sized for the work at hand: no more sequence slots than prompts
    rt = dataclasses.replace(L.runtime, max_num_seqs=min(L.runtime.max_num_seqs, len(prompts)))
    llm = LLM(L.model, rt, L.tokenizer) if ctx is None else ctx.engine(rt)
    t1 = time.perf_counter()
    try:
        results = llm.generate(prompts, params, progress=not a.json and len(prompts) > 1)
    finally:
        if ctx is not None:
            ctx.close(llm)
    run_s = time.perf_counter() - t1
    t = llm.stats.as_dict()
    for ids, res in zip(prompts, results):
        if a.json:
            print(
                json.dumps(
                    {
                        "model": L.cfg.name,
                        "backend": L.model.ops.name,
                        "dtype": L.runtime.dtype,
                        "mode": L.runtime.mode,
                        "decode": DECODE_LABEL[llm.graph_mode],
                        "prompt_ids": ids,
                        "generated_ids": res.output_ids,
                        "text": res.text,
                        "finish_reason": res.finish_reason,
                        "logprobs": [dataclasses.asdict(x) for x in res.logprobs] if res.logprobs is not None else None,
                        "timings": {"load_s": load_s, "run_s": run_s, **t},
                        "speculative": _spec_summary(llm),
                    }
                )
            )
        else:
            print(res.text)
    if not a.json:
        _print_generate_summary(L, llm, prompts, results, load_s, t)
    return 0


def _spec_summary(llm) -> dict | None:
    """Speculative decoding's counters (vLLM's spec_decode metrics) for one run, or None when off."""
    drafter = getattr(llm, "drafter", None)
    if drafter is None:
        return None
    st = drafter.stats
    return {
        "num_speculative_tokens": drafter.k,
        "num_drafts": st.num_drafts,
        "num_draft_tokens": st.num_draft_tokens,
        "num_accepted_tokens": st.num_accepted_tokens,
        "accepted_per_pos": list(st.accepted_per_pos),
        "mean_acceptance_length": st.mean_acceptance_length(),
        "acceptance_rate_per_pos": st.acceptance_rate_per_pos(),
    }


def _start_ranks(a, progress: bool = True):
    """With tensor_parallel_size x data_parallel_size > 1: join the deployment (spawning the local
    ranks unless torchrun started them) and return this rank's context; None on one device."""
    from .dist.launch import LoadArgs, layout_of, start
    from .runtime import resolve

    _, rt = resolve(a.checkpoint, a.config, a.runtime, _overrides(a))
    if layout_of(rt).is_single:
        return None
    return start(LoadArgs(a.checkpoint, a.config, a.runtime, _overrides(a), a.seed_weights), rt, progress)


def cmd_init(a) -> int:
    from .config import load_config_file
    from .weights import init_checkpoint

    cfg, _ = load_config_file(a.config)
    if cfg is None:
        raise InputError(f"{a.config}: no 'model:' section to build a checkpoint from")
    out = init_checkpoint(cfg, a.out, quant=a.quant, seed=a.seed, max_shard_bytes=int(a.shard_mb * 2**20))
    print(f"wrote {cfg.name} ({a.quant}, seed {a.seed}) to {out}")
    return 0


def cmd_info(a) -> int:
    from .cache import cache_bytes_per_token
    from .runtime import resolve

    cfg, rt = resolve(a.checkpoint, a.config, a.runtime, _overrides(a))
    elem = {"float32": 4, "float64": 8}.get(rt.dtype, 2)
    ours = cache_bytes_per_token(cfg, elem_bytes=elem)
    # the production layout of spec §3.3: FP8 nope + bf16 rope + one ue8m0 scale per 64 (+ pad to 8)
    E = (cfg.head_dim - cfg.qk_rope_head_dim) + 2 * cfg.qk_rope_head_dim + 8
    prod = cache_bytes_per_token(cfg, entry_bytes=E, index_bytes=cfg.index_head_dim // 2 + cfg.index_head_dim // 32)
    n = ours["layers"]
    info = {
        "model": cfg.name,
        "layers": {"total": cfg.num_hidden_layers, **n, "mtp": cfg.num_nextn_predict_layers},
        "hca_ratio": cfg.hca_ratio,
        "params": _param_count(cfg),
        "runtime": {"backend": rt.backend, "dtype": rt.dtype, "mode": rt.mode},
        "cache_bytes_per_token": {"layout": f"this cache ({rt.dtype} entries)", **_fmt_cache(ours)},
        "cache_bytes_per_token_fp8_layout": {"layout": "FP8 production layout (spec §3.3)", **_fmt_cache(prod)},
    }
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(cfg.short())
    print(f"layers: {n['sliding']} sliding, {n['csa']} CSA (ratio 4 + indexer top-{cfg.index_topk}), "
          f"{n['hca']} HCA (ratio {cfg.hca_ratio}), {cfg.num_nextn_predict_layers} MTP; window {cfg.sliding_window}")
    p = info["params"]
    print(f"parameters: {p['total'] / 1e9:.3f} B total, {p['active'] / 1e9:.3f} B active per token "
          f"(+ {p['mtp'] / 1e9:.3f} B in the MTP block)")
    for title, c in (("this cache", ours), ("FP8 layout", prod)):
        pl = c["per_layer"]
        print(f"KV cache, {title}: entry {c['entry_bytes']} B, indexer key {c['index_bytes']} B; per context token: "
              f"CSA layer {pl['csa']:.2f} B, HCA layer {pl['hca']:.4f} B, sliding 0 B; "
              f"total {c['per_token_total']:.1f} B/token ({c['per_token_total'] * 2**20 / 2**30:.2f} GiB at 1M tokens) "
              f"+ window rings {c['window_ring_bytes'] / 2**20:.2f} MiB per sequence")
    return 0


def _fmt_cache(c):
    return {"entry_bytes": c["entry_bytes"], "index_key_bytes": c["index_bytes"], "per_layer_type": c["per_layer"],
            "total_per_token": c["per_token_total"], "window_ring_bytes_per_sequence": c["window_ring_bytes"]}


def _param_count(cfg) -> dict:
    from .weights import expected_tensors

    total = active = mtp = 0
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    for name, spec in expected_tensors(cfg).items():
        n = 1
        for s in spec.shape:
            n *= s
        if name.startswith("mtp."):  # the published totals (284B / 1.6T) leave the MTP block out
            mtp += n
            continue
        total += n
        active += n * k / E if ".experts." in name else n
    return {"total": int(total), "active": int(active), "mtp": int(mtp)}


def cmd_backends(a) -> int:
    import backends

    if a.json:
        print(json.dumps([{**i.__dict__, "ops": sorted(i.ops), "options": [o.as_dict(i.name) for o in i.options]}
                          for i in backends.matrix()], indent=1))
    else:
        print(backends.format_matrix())
        for report in backends.readiness_reports():
            print()
            print(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="DeepSeek V4 on CPU, NVIDIA and Ascend, with parity checks.",
                                epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text or ids")
    _add_model_args(g)
    _add_engine_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (tokenised with the checkpoint's tokenizer.json, or "
                   "bytes); repeat it to run several prompts through the engine together")
    g.add_argument("--ids", help="prompt as comma-separated token ids")
    g.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=32)
    g.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop before this many tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--stop", action="append", help="stop string (repeatable): matched on the text, not printed")
    g.add_argument("--stop-token-ids", type=lambda v: [int(x) for x in v.split(",") if x.strip()],
                   help="comma-separated token ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    g.add_argument("--logprobs", type=int, default=None, help="with --json: the chosen token's logprob and the top N")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("init", help="write a seeded random-weight checkpoint in the official format")
    i.add_argument("--config", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--quant", choices=["bf16", "fp32", "fp8"], default="bf16",
                   help="bf16/fp32 floats, or fp8 = the official FP8 + FP4-expert forms")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--shard-mb", type=float, default=1024.0, help="maximum shard size in MiB")
    i.set_defaults(fn=cmd_init)

    n = sub.add_parser("info", help="model summary and KV-cache bytes per token")
    _add_model_args(n)
    n.add_argument("--json", action="store_true")
    n.set_defaults(fn=cmd_info)

    try:
        from parity.cli import add_parser as add_parity
    except ImportError:  # parity is optional at import time; its absence must not break the core CLI
        add_parity = None
    if add_parity is not None:
        add_parity(sub)

    from .serve.server import add_parser as add_serve  # stdlib only: fastapi is imported when `serve` runs

    add_serve(sub, _add_model_args, _add_engine_args, _overrides)

    from .dist.deployment import add_parser as add_plan  # deployment plans: arithmetic only, no torch.distributed

    add_plan(sub)

    b = sub.add_parser("backends", help="backends x ops x availability")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_backends)
    return p


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"dsv4: warning: {message}\n"  # one line, as errors are (not the file and source line)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        if getattr(a, "pick_model", False):
            pick_model(a)
        return a.fn(a)
    except DSV4Error as e:
        print(f"dsv4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
