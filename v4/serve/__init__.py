"""`dsv4 serve`: an OpenAI-compatible HTTP server on the engine (the `serve` extra: fastapi, uvicorn,
prometheus_client). The core never imports this package; only the `serve` command does.

- `async_engine`: the engine's step loop on its own thread, fed from asyncio;
- `protocol`: request bodies;  `errors`: vLLM's error envelope;  `metrics`: Prometheus, vLLM's names;
- `openai_serving`, `completions`, `chat`: the endpoints;  `app`: routes;  `server`: the command.
"""
