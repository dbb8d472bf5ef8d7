"""`edge-run serve BUNDLE`: the OpenAI chat-completions API on a local HTTP port (see server.py)."""
from __future__ import annotations

import argparse
import sys

from ..server import DEFAULT_HOST, DEFAULT_QUEUE, MAX_BODY


def configure(p: argparse.ArgumentParser) -> None:
    from .run import add_runtime_arguments

    p.add_argument("bundle", help="bundle folder (made by edge-export)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="answer length when a request does not say")
    p.add_argument("--queue", type=int, default=DEFAULT_QUEUE, metavar="N",
                   help="requests waiting or running at once (fewer if the budget's headroom is smaller); "
                        "more get HTTP 503")
    p.add_argument("--max-body", type=int, default=MAX_BODY, metavar="BYTES", help="largest request body")
    add_runtime_arguments(p, "300MB (context and queue chosen to fit)")

def run(args) -> int:
    """Serve a bundle over the OpenAI chat-completions API (streaming and not) on a local port."""
    from .. import load
    from ..errors import EdgeError
    from ..generation.stats import parse_size
    from ..server import make_server, queue_limit

    for name in ("port", "queue", "max_tokens", "max_body"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1) or (name == "port" and value > 65535):
            raise EdgeError(f"--{name.replace('_', '-')} is out of range: {value}")
    budget = parse_size(args.budget) if args.budget is not None else None
    model = load(args.bundle, backend=args.backend, threads=args.threads, context=args.context,
                 memory_budget=budget, kv_dtype=args.kv_dtype, verify=args.verify)
    limit = queue_limit(model, budget, args.queue)
    try:
        server = make_server(model, args.host, args.port, limit=limit, max_tokens=args.max_tokens,
                             max_body=args.max_body)
    except OSError as e:
        raise EdgeError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"edge-run serve: {server.service.name} on http://{host}:{port}/v1 ({model._describe()}; "
          f"{limit} requests in flight at most)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
