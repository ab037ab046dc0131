"""`dsv4 parity record | compare | run | ops | verify` (wired into `v4.cli` through `add_parser`).

This module does not import `v4.cli` (the core CLI imports it): run it as `dsv4 parity ...`.

Exit codes: 0 pass, 1 fail (some hook point, the logits or the greedy continuation disagree
beyond the profile), 2 not comparable / unusable input (different weights, config or prompts,
damaged bundle, bad option), said in one sentence by `v4.cli.main`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from v4.errors import InputError

DTYPE_ALIASES = {"fp64": "float64", "f64": "float64", "fp32": "float32", "f32": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "f16": "float16", "float64": "float64", "float32": "float32",
                 "bfloat16": "bfloat16", "float16": "float16"}

EXAMPLES = """examples:
  dsv4 parity run                                    # available backends x fp64/fp32/bf16, smoke suite, trained tiny-v4
  dsv4 parity run --config tiny --suite boundaries   # the same on seeded random weights
  dsv4 parity record --backend reference --dtype bf16 --suite boundaries --out /tmp/cpu-bf16
  dsv4 parity compare /tmp/cpu-fp64 /tmp/npu-bf16 --report /tmp/report
  dsv4 parity ops --backend reference --dtype fp32
  dsv4 parity verify /data/golden-fp64 --backend ascend --dtype bf16   # on the NPU machine: ops + model, one verdict
"""


def _dtype(s: str) -> str:
    if s not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"unknown dtype {s!r}; use fp64, fp32, bf16 or fp16")
    return DTYPE_ALIASES[s]


def _model_args(p):
    from v4.runtime import add_runtime_flags

    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="checkpoint directory (config.json + *.safetensors)")
    g.add_argument("--config", help="model config with seeded random weights (tiny, small, tiny-v4, ...); default: the "
                   "suite's config, else the shipped trained tiny-v4 checkpoint")
    p.add_argument("--runtime", help="runtime YAML (configs/cpu.yaml, ...)")
    p.add_argument("--device", help="torch device, e.g. cpu, cuda:0")
    p.add_argument("--mode", choices=["plain", "exact"], help="numerics mode (default: the config's, plain)")
    p.add_argument("--seed-weights", type=int, default=None,
                   help="seed of the random weights used with --config (default 0); a checkpoint's weights are fixed")
    add_runtime_flags(p, "greedy continuation replayed from captured graphs where the backend can capture "
                      "(default: runtime.decode_graphs, auto = the backend's graphs where its device has them: CUDA "
                      "graphs on cuda; on = also the emulated path without them); each bundle's options.decode says "
                      "how it decoded")


def _prompt_args(p, required: bool):
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument(
        "--suite",
        help="suite name (smoke, boundaries, long) or suite YAML path" + ("" if required else "; default smoke"),
    )
    g.add_argument(
        "--prompts", help="JSONL file: one {\"ids\": [...]} or {\"text\": \"...\"} per line (optional \"batch\")"
    )
    p.add_argument("--greedy", type=int, help="greedy tokens per prompt (default: the suite's, else 8)")
    p.add_argument("--layers", help="hook points of blocks: all | none | e.g. 0,2 (default: the suite's, else all)")
    p.add_argument("--logits", help="all | last:K (default: the suite's, else all)")
    p.add_argument(
        "--prefill-chunk", type=int, help="prefill in chunks of this many tokens (default: the suite's, else one step)"
    )
    p.add_argument("--no-batch", action="store_true", help="record every prompt alone, ignoring batch groups")


def _add_record_parser(ps):
    r = ps.add_parser("record", help="record a golden bundle (ids, logits, greedy tokens, hook tensors)")
    r.add_argument("--backend", default="auto", help="backend registry name (reference, cuda, ascend, auto)")
    r.add_argument("--dtype", type=_dtype, help="fp64 | fp32 | bf16 | fp16 (default: the runtime's)")
    _model_args(r)
    _prompt_args(r, required=True)
    r.add_argument("--out", required=True, help="bundle directory to write")
    d = r.add_argument_group("multi-device (one process per rank; the bundle compares with a one-device one)")
    d.add_argument("-tp", "--tensor-parallel-size", type=int)
    d.add_argument("-dp", "--data-parallel-size", type=int, help="every prompt runs on DP group 0; the others join "
                   "each step's expert exchange")
    d.add_argument("--enable-expert-parallel", action="store_true", default=None)
    d.add_argument("--moe-comm", choices=["alltoall", "allgather"])
    r.add_argument("--speculative-config", help="decode the greedy continuation with MTP speculative decoding, e.g. "
                   "'{\"method\": \"mtp\", \"num_speculative_tokens\": 2}' (recorded in the bundle's options)")
    r.set_defaults(fn=cmd_record)
    return r


def _add_compare_parser(ps):
    c = ps.add_parser("compare", help="score bundle B against bundle A")
    c.add_argument("a", help="baseline bundle (e.g. reference fp64)")
    c.add_argument("b", help="bundle to score")
    c.add_argument("--profile", help="tolerance profile (default: from the bundles' dtype and mode)")
    c.add_argument("--floor", help="a second recording of B on the same machine: judge against B's noise floor")
    c.add_argument("--report", help="directory for report.json, report.md (+ per_layer.png)")
    c.add_argument("--no-mask", action="store_true",
                   help="compare every token at every hook, also after its top-k picks or experts differed upstream")
    c.set_defaults(fn=cmd_compare)
    return c


def _add_run_parser(ps):
    u = ps.add_parser("run", help="record several backends here and compare them against the first")
    u.add_argument("--backends", default="auto",
                   help="comma list of name[:dtype[:mode]], the first is the baseline; auto = reference:fp64 "
                        "then every available backend in fp32 and bf16 (default auto)")
    _model_args(u)
    _prompt_args(u, required=False)
    u.add_argument("--repeat", type=int, default=1, help="record each backend N times; N >= 2 measures its noise floor")
    u.add_argument("--profile", help="tolerance profile for every comparison (default: per compared dtype and mode)")
    u.add_argument("--out", help="keep the bundles in this directory (default: a temporary directory)")
    u.add_argument("--report", help="directory for one report per comparison")
    u.set_defaults(fn=cmd_run)
    return u


def _add_ops_parser(ps):
    o = ps.add_parser("ops", help="every op of the op set on random boundary inputs against reference in fp64")
    o.add_argument("--backend", default="reference")
    o.add_argument("--dtype", type=_dtype, default="float32")
    o.add_argument("--mode", choices=["plain", "exact"], default="plain")
    o.add_argument("--device", help="torch device of the backend")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--profile", help="tolerance profile (default: from --dtype and --mode)")
    o.set_defaults(fn=cmd_ops)
    return o


def _add_verify_parser(ps):
    v = ps.add_parser(
        "verify", help="on this machine: op suite + model parity of a backend against a golden bundle, one verdict"
    )
    v.add_argument("golden", help="golden bundle recorded elsewhere (e.g. reference fp64 on a GPU or CPU machine)")
    v.add_argument("--backend", default="auto", help="backend to verify here (ascend, cuda, reference, auto)")
    v.add_argument("--dtype", type=_dtype, help="dtype to run here (default: the golden bundle's)")
    v.add_argument("--checkpoint", help="this machine's copy of the checkpoint the golden bundle was recorded from")
    v.add_argument("--runtime", help="runtime YAML (configs/ascend.yaml, ...)")
    v.add_argument("--device", help="torch device, e.g. npu:0")
    v.add_argument("--profile", help="tolerance profile (default: from the dtype and mode)")
    v.add_argument("--out", help="also keep this machine's recording as a bundle here")
    v.add_argument("--report", help="directory for report.json, report.md (+ per_layer.png)")
    v.add_argument("--skip-ops", action="store_true", help="model parity only")
    v.set_defaults(fn=cmd_verify)
    return v


def add_parser(sub) -> None:
    p = sub.add_parser("parity", help="record, compare and check cross-backend / cross-machine parity",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ps = p.add_subparsers(dest="parity_cmd", required=True)
    subs = [_add_record_parser(ps), _add_compare_parser(ps), _add_run_parser(ps), _add_ops_parser(ps),
            _add_verify_parser(ps)]
    for sp in subs:
        sp.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's); 1 is fastest for the tiny config on a busy machine")


def _threads(a) -> None:
    if getattr(a, "threads", None):
        import torch

        if a.threads < 1:
            raise InputError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)


# ---------------------------------------------------------------------------------------- record
def _choose_model(a) -> None:
    """Once per command: the model flags; else the suite's `config:` (the `long` suite names one);
    else the shipped trained tiny-v4 checkpoint, said on stderr in one line."""
    from v4.runtime import DEFAULT_CHECKPOINT, DEFAULT_MODEL_NOTE

    from . import record

    if a.checkpoint is None and a.config is None:
        suite = record.load_suite(a.suite or "smoke") if (a.suite or not a.prompts) else None
        if suite is not None and suite.config:
            a.config = suite.config
        else:
            a.checkpoint = str(DEFAULT_CHECKPOINT)
            a.model_note = f"dsv4: {DEFAULT_MODEL_NOTE}"  # said once the model is built: an error stays one line
    if a.seed_weights is not None and a.config is None:
        raise InputError("--seed-weights applies to --config (seeded random weights) only; a checkpoint's weights "
                         "are fixed: drop it or add --config NAME")
    if a.seed_weights is None:
        a.seed_weights = 0


def _speculative(a, built):
    """--speculative-config, checked before anything is recorded (parity record only)."""
    from v4.config import SpeculativeConfig

    value = getattr(a, "speculative_config", None)
    if SpeculativeConfig.parse(value, "parity record") is None:
        return None
    if built.runtime.tensor_parallel_size * built.runtime.data_parallel_size > 1:
        raise InputError("--speculative-config runs on one device for now; drop it or -tp / -dp")
    return value


def _plan(a, backend: str, dtype: str | None, mode: str | None):
    """(built model, prompts, options, suite name, prompts file) from the CLI arguments (after _choose_model)."""
    from . import record

    suite = record.load_suite(a.suite or "smoke") if (a.suite or not a.prompts) else None
    from v4.runtime import runtime_flag_overrides

    over = {"backend": backend, "dtype": dtype, "mode": mode, "device": a.device, **runtime_flag_overrides(a)}
    for k in ("tensor_parallel_size", "data_parallel_size", "enable_expert_parallel", "moe_comm"):
        over[k] = getattr(a, k, None)
    built = record.build(a.checkpoint, a.config, a.runtime, over, seed=a.seed_weights)
    if getattr(a, "model_note", None):
        print(a.model_note, file=sys.stderr)
        a.model_note = None
    if built.model is None:  # a rank other than 0 under torchrun: no prompts of its own
        return built, None, None, None, None
    sopt = suite.options if suite else {}
    opts = record.Options(
        greedy_tokens=a.greedy if a.greedy is not None else sopt.get("greedy_tokens", 8),
        layers=a.layers or sopt.get("layers", "all"),
        logits=a.logits or sopt.get("logits", "all"),
        prefill_chunk=a.prefill_chunk
        if a.prefill_chunk is not None
        else sopt.get("prefill_chunk", built.runtime.prefill_chunk),
        batching=not a.no_batch,
        block_size=built.runtime.block_size,
        decode_graphs=built.runtime.decode_graphs,
        speculative_config=_speculative(a, built),
    )
    bos = built.cfg.bos_token_id
    prompts = (
        record.suite_prompts(suite, built.tokenizer, bos)
        if suite
        else record.load_prompts_file(a.prompts, built.tokenizer, bos)
    )
    return built, prompts, opts, (suite.name if suite else None), a.prompts


def _record_one(a, backend, dtype, mode, out=None):
    from . import record

    built, prompts, opts, suite, pfile = _plan(a, backend, dtype, mode)
    if built.model is None:
        built.ranks.follow()
        return None
    if built.ranks is None:
        return record.record_bundle(built, prompts, opts, suite, pfile, out)
    try:
        return record.record_bundle(built, prompts, opts, suite, pfile, out)
    finally:
        built.ranks.close()


def cmd_record(a) -> int:
    _threads(a)
    _choose_model(a)
    t0 = time.perf_counter()
    b = _record_one(a, a.backend, a.dtype, a.mode, a.out)
    if b is None:  # a rank other than 0 under torchrun: it followed rank 0's steps
        return 0
    size = sum(p.stat().st_size for p in Path(a.out).iterdir()) / 2**20
    print(f"wrote {a.out}: {b.label()} on {b.meta['backend']['device_name']}, {b.num_prompts} prompts, "
          f"{len(b.hooks)} hook points, {size:.1f} MiB in {time.perf_counter() - t0:.2f}s")
    return 0


# ---------------------------------------------------------------------------------------- compare
def cmd_compare(a) -> int:
    _threads(a)
    from . import bundle
    from . import report
    from .compare import compare

    A, B = bundle.read(a.a), bundle.read(a.b)
    floor = None
    if a.floor:
        floor = compare(B, bundle.read(a.floor), a.profile, mask=not a.no_mask)
    c = compare(A, B, a.profile, floor, mask=not a.no_mask)
    print(report.render(c))
    if a.report:
        files = report.write(c, a.report)
        print(f"report: {', '.join(str(f) for f in files)}")
    return c.exit_code


# ---------------------------------------------------------------------------------------- run
def parse_backends(spec: str, mode: str | None) -> list:
    """'auto' or 'name[:dtype[:mode]],...' -> [(name, dtype|None, mode|None)]."""
    import backends

    if spec == "auto":
        # as the registry's `auto`: available and meant to be picked (not e.g. Triton's interpreter)
        others = [n for n in backends.names() if n != "reference"
                  and backends.probe(n).available and getattr(backends.probe(n), "auto", True)]
        out = [("reference", "float64", mode)]
        for n in others or ["reference"]:
            out += [(n, "float32", mode), (n, "bfloat16", mode)]
        return out
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if not parts[0] or len(parts) > 3:
            raise InputError(
                f"--backends: cannot read {item!r}; use name[:dtype[:mode]], e.g. reference:fp64,cuda:bf16"
            )
        dt = None
        if len(parts) > 1:
            if parts[1] not in DTYPE_ALIASES:
                raise InputError(f"--backends: unknown dtype {parts[1]!r} in {item!r}; use fp64, fp32, bf16 or fp16")
            dt = DTYPE_ALIASES[parts[1]]
        md = parts[2] if len(parts) > 2 else mode
        if md not in (None, "plain", "exact"):
            raise InputError(f"--backends: unknown mode {md!r} in {item!r}; use plain or exact")
        out.append((parts[0], dt, md))
    if len(out) < 2:
        raise InputError("--backends needs at least two entries (the first is the baseline)")
    return out


def cmd_run(a) -> int:
    _threads(a)
    from . import report
    from .compare import compare, merge_floors

    if a.repeat < 1:
        raise InputError(f"--repeat must be >= 1, got {a.repeat}")
    specs = parse_backends(a.backends, a.mode)
    import backends

    for name, _, _ in specs:  # an unavailable backend fails before minutes of recording the others
        backends.resolve(name)
    _choose_model(a)
    out_root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="dsv4-parity-"))
    t_all = time.perf_counter()
    recs, floors = [], []
    try:
        for k, (name, dt, md) in enumerate(specs):
            reps = []
            for r in range(a.repeat):
                label = f"{k}-{name}-{dt or 'default'}-{md or 'default'}" + (f"-r{r}" if a.repeat > 1 else "")
                t0 = time.perf_counter()
                b = _record_one(a, name, dt, md, out_root / label)
                reps.append(b)
                where = f" -> {out_root / label}" if a.out else ""  # temporary bundles go away at the end
                print(f"recorded {b.label()} ({b.num_prompts} prompts) in {time.perf_counter() - t0:.2f}s{where}")
            recs.append(reps[0])
            fl = merge_floors(*[compare(reps[0], x, a.profile) for x in reps[1:]]) if len(reps) > 1 else None
            floors.append(fl)
            if fl is not None:
                print(f"  noise floor of {reps[0].label()}: " + _floor_summary(fl))
        code = 0
        summary = []
        for k in range(1, len(recs)):
            floor = merge_floors(floors[0], floors[k])
            c = compare(recs[0], recs[k], a.profile, floor)
            print("\n" + report.render(c))
            if a.report:
                d = Path(a.report) / f"{k}-{recs[k].label().replace('/', '-')}"
                report.write(c, d)
                print(f"report: {d}")
            summary.append((recs[k].label(), c))
            code = max(code, c.exit_code)
        print(f"\nsummary (baseline {recs[0].label()}, {time.perf_counter() - t_all:.1f}s):")
        for label, c in summary:
            print(
                f"  {label:28s} {'PASS' if c.passed else 'FAIL'}  profile {c.profile.name:9s} "
                f"{report.first_break_line(c)}"
            )
        return code
    finally:
        if not a.out:
            shutil.rmtree(out_root, ignore_errors=True)


def _floor_summary(fl) -> str:
    worst_cos = min((r.metrics["cosine"] for r in fl.rows if "cosine" in r.metrics), default=1.0)
    worst_nmax = max((r.metrics["nmax"] for r in fl.rows if "nmax" in r.metrics), default=0.0)
    if worst_cos == 1.0 and worst_nmax == 0.0:
        return "zero (bit-identical repeats)"
    return f"worst 1-cos {1 - worst_cos:.1e}, worst nmax {worst_nmax:.1e}"


# ---------------------------------------------------------------------------------------- ops
def cmd_ops(a) -> int:
    _threads(a)
    from . import opcheck

    res = opcheck.run(a.backend, a.dtype, a.mode, a.device, a.seed, a.profile)
    print(opcheck.render(res))
    return 0 if res.passed else 1


def cmd_verify(a) -> int:
    _threads(a)
    from . import verify

    return verify.run(
        a.golden, a.backend, a.dtype, a.checkpoint, a.device, a.runtime, a.profile, a.out, a.report, a.skip_ops
    )

