"""`kiln serve`: an OpenAI-compatible HTTP server over kiln artifacts (docs/serve.md).

Runtime side only: it imports kiln.runtime, FastAPI and uvicorn (the `serve` extra), never the
compiler. Modules by concern: `models` (which artifacts, under which names), `scheduler` (one
decode thread and continuous batch per LLM), `app` (routes), `params` (request checks),
`text` (streamed detokenization, stop strings), `guard` (API key, body limit), `metrics`.
"""

from __future__ import annotations

import logging
import signal
import sys


def serve(specs: list[str], host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          verify: bool = True, log_level: str = "warning", lora: list[str] | None = None, **settings) -> None:
    """Load the artifacts (and `lora`: `[MODEL:]NAME=ADAPTER_DIR` adapters into their LoRA slots)
    and serve them until SIGTERM / SIGINT (then exit normally)."""
    import uvicorn

    from kiln.serve.app import Settings, create_app
    from kiln.serve.models import load_all

    served = load_all(specs, threads, verify, lora)
    config = Settings(**settings)
    app, _ = create_app(served, config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, s in served.items():
        what = f"LoRA adapter in slot {s.slot} of {s.base.name}" if s.base is not None else f"from {s.art.path}"
        print(f"kiln serve: {name} ({s.task}) {what}", file=sys.stderr, flush=True)
    print(f"kiln serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=config.grace, lifespan="on"))
    # uvicorn re-raises the signal that stopped it once it has shut down; the handlers it restores
    # are these (a graceful stop is a normal exit: 0), then the caller's.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(1)
