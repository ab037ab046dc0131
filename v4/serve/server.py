"""`dsv4 serve`: load the model, start the engine loop and serve the app with uvicorn.

SIGTERM (and Ctrl-C) stop the server gracefully: it stops accepting connections, lets requests in
flight finish for up to --shutdown-timeout seconds, aborts what is left (their blocks are freed),
stops the engine loop and exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger("dsv4")


def serve(a, overrides: dict) -> int:
    import uvicorn

    from ..chat import load_chat_template
    from ..engine import LLM
    from ..runtime import load
    from .app import build_app
    from .async_engine import AsyncEngine, EngineThread
    from .metrics import ServerMetrics
    from .openai_serving import ServerContext

    from ..cli import _start_ranks

    def build():
        ranks = _start_ranks(a)  # None on one device; this rank's part of a multi-device deployment otherwise
        if ranks is not None and ranks.rank != 0:
            return ranks, None, None
        L = (
            ranks.loaded
            if ranks is not None
            else load(a.checkpoint, a.config, a.runtime, overrides, seed=a.seed_weights)
        )
        return ranks, L, (LLM(L.model, L.runtime, L.tokenizer) if ranks is None else ranks.engine(L.runtime))

    worker = EngineThread()  # builds the model and later steps it: torch runs on one thread (see EngineThread)
    ranks, L, llm = worker.submit(build).result()
    if L is None:  # a rank other than 0 under torchrun: no HTTP, follow rank 0 until it stops
        return worker.submit(ranks.follow).result()
    name = a.served_model_name or a.checkpoint or L.cfg.name
    metrics = ServerMetrics(name)
    engine = AsyncEngine(llm, max_waiting=a.max_waiting, on_step=metrics.on_step, worker=worker)
    template = load_chat_template(a.checkpoint) if a.checkpoint else None
    bos, eos = _special_token_texts(a.checkpoint)
    ctx = ServerContext(
        engine, L.tokenizer, name, L.cfg.vocab_size, L.runtime.max_model_len, metrics, template, bos, eos
    )
    app = build_app(ctx, max_body_bytes=int(a.max_body_mb * 2**20))
    print(
        f"dsv4 serve: {name} ({L.cfg.name} on {L.model.ops.name}/{L.runtime.dtype}/{L.runtime.mode}, "
        f"chat format: {'jinja template' if template else 'DeepSeek V4'}) at http://{a.host}:{a.port}",
        file=sys.stderr,
    )
    print(llm.runner.cache_summary, file=sys.stderr)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level=a.uvicorn_log_level,
                            timeout_graceful_shutdown=a.shutdown_timeout, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    # uvicorn re-raises a caught SIGTERM / SIGINT once it has shut down; with handlers of ours in
    # place that re-raise is a no-op, so a graceful stop exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if ranks is not None:  # the other ranks leave their loops (or are already gone) and the spawned ones are reaped
        worker.submit(ranks.close, llm).result()
    return 0


def _special_token_texts(checkpoint: str | None) -> tuple[str, str]:
    """BOS and EOS as text, for Jinja templates that write them (tokenizer_config.json)."""
    from ..tokenizer import BOS_TEXT, EOS_TEXT

    path = Path(checkpoint) / "tokenizer_config.json" if checkpoint else None
    if path is None or not path.is_file():
        return BOS_TEXT, EOS_TEXT
    cfg = json.loads(path.read_text())

    def text(v, default):
        return v.get("content", default) if isinstance(v, dict) else (v or default)

    return text(cfg.get("bos_token"), BOS_TEXT), text(cfg.get("eos_token"), EOS_TEXT)


def add_parser(sub, add_model_args, add_engine_args, overrides) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra: pip install 'dsv4[serve]')")
    add_model_args(s)
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--served-model-name", help="the model name clients send (default: the checkpoint path or config name)"
    )
    s.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a slot; beyond that new requests get 503 (default 256)")
    s.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are aborted (default 10)")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB; larger gets 413")
    s.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.set_defaults(fn=lambda a: _run(a, overrides(a)))


def _run(a, overrides: dict) -> int:
    from ..errors import InputError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise InputError(f"dsv4 serve needs the serve extra ({e.name} is missing): pip install 'dsv4[serve]'") from None
    if a.max_waiting < 0:
        raise InputError(f"--max-waiting must be >= 0, got {a.max_waiting}")
    return serve(a, overrides)
