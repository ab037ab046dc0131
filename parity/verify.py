"""`dsv4 parity verify GOLDEN --backend B`: is this machine's backend as good as the golden bundle?

The cross-machine step of the parity workflow: a golden bundle recorded elsewhere (a GPU or CPU
machine, usually reference fp64/fp32) is copied here; one command then
1. runs the op suite on backend B here (every op against the reference in fp64),
2. re-records the golden bundle's prompts on backend B here, with the same model config, weights
   (its random seed, or --checkpoint for a checkpoint; the weights hash must match), logits
   positions, hook points and greedy length,
3. compares that recording against the golden bundle with the tolerance profile of B's dtype
   and mode, and prints one verdict. Exit 0 = both pass, 1 = a check failed, 2 = not comparable.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from v4.errors import InputError

from . import bundle
from . import record


def golden_prompts(g: bundle.Bundle) -> list:
    """The golden bundle's prompts, as token ids (text is kept for the report only)."""
    out = []
    for p in g.meta["prompts"]:
        i = p["index"]
        out.append(
            record.Prompt(
                ids=g.t(i, "input_ids").tolist(), text=p.get("text"), batch=p.get("batch"), name=p.get("name")
            )
        )
    return out


def golden_options(g: bundle.Bundle, block_size: int, decode_graphs: str = "off") -> record.Options:
    """The golden recording's options; how this machine decodes (decode_graphs) is its own runtime's."""
    o = g.meta.get("options") or {}
    return record.Options(
        greedy_tokens=int(g.meta.get("greedy_tokens", o.get("greedy_tokens", 8))),
        layers=o.get("layers", "all"),
        logits=o.get("logits", "all"),
        prefill_chunk=int(o.get("prefill_chunk", 0)),
        batching=bool(o.get("batching", True)),
        block_size=block_size,
        decode_graphs=decode_graphs,
    )


def rebuild(g: bundle.Bundle, backend: str, dtype: str | None, checkpoint: str | None, device: str | None,
            runtime: str | None, workdir: Path) -> record.Built:
    """The golden bundle's model on `backend` here."""
    w = g.meta["weights"]
    over = {"backend": backend, "dtype": dtype or g.meta["dtype"], "mode": g.meta["mode"], "device": device}
    if w["source"] == "checkpoint":
        if checkpoint is None:
            raise InputError(f"{g.path} was recorded from checkpoint {w.get('path')}: pass --checkpoint DIR with that "
                             f"checkpoint on this machine (its hash must be {w['hash'][:12]})")
        return record.build(checkpoint, None, runtime, over)
    if checkpoint is not None:
        raise InputError(f"{g.path} was recorded with random weights (seed {w.get('seed')}); drop --checkpoint")
    cfg_path = workdir / "config.json"  # the golden bundle carries its whole model config
    cfg_path.write_text(json.dumps(g.meta["model"]["config"]))
    return record.build(None, str(cfg_path), runtime, over, seed=int(w["seed"]))


def run(golden: str, backend: str, dtype: str | None = None, checkpoint: str | None = None, device: str | None = None,
        runtime: str | None = None, profile: str | None = None, out: str | None = None, report: str | None = None,
        skip_ops: bool = False, seed: int = 0) -> int:
    from . import opcheck
    from .report import render as render_report, write as write_report
    from .compare import compare

    g = bundle.read(golden)
    dt = dtype or g.meta["dtype"]
    ops_ok = True
    if not skip_ops:
        print(f"== op suite: {backend} {dt} {g.meta['mode']} against reference fp64")
        res = opcheck.run(backend, dt if dt != "float64" else "float32", g.meta["mode"], device, seed, None)
        print(opcheck.render(res))
        ops_ok = res.passed
    print(
        f"\n== model parity: {backend} {dt} here against golden {g.label()} ({g.path}, "
        f"recorded on {g.meta['backend']['device_name']})"
    )
    with tempfile.TemporaryDirectory(prefix="dsv4-verify-") as tmp:
        built = rebuild(g, backend, dt, checkpoint, device, runtime, Path(tmp))
        prompts = golden_prompts(g)
        opts = golden_options(g, built.runtime.block_size, built.runtime.decode_graphs)
        mine = record.record_bundle(built, prompts, opts, g.meta.get("suite"), g.meta.get("prompts_file"), out)
    c = compare(g, mine, profile)
    print(render_report(c))
    if report:
        files = write_report(c, report)
        print(f"report: {', '.join(str(f) for f in files)}")
    verdict = ops_ok and c.passed
    where = mine.meta["backend"]["device_name"]
    print(f"\nverdict: {'PASS' if verdict else 'FAIL'}: {mine.label()} on {where} vs golden {g.label()}: "
          f"ops {'skipped' if skip_ops else ('PASS' if ops_ok else 'FAIL')}, model {'PASS' if c.passed else 'FAIL'} "
          f"(profile {c.profile.name})")
    return 0 if verdict else max(1, c.exit_code)
