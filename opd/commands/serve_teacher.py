"""``opd serve-teacher MODEL``: serve a causal LM as an opd teacher over HTTP.

The server answers ``POST /v1/score`` with the model's log-probs on the sequences it is sent —
sampled-token, top-k, and the log-probs of caller-chosen token ids at each position (the student's
top-k), at the temperature the request names — batching concurrent requests into shared forward
passes. A run uses it with ``teacher.server=http://HOST:PORT teacher.protocol=opd``;
docs/serving.md has the protocol and a GPU recipe.
"""

from __future__ import annotations

import argparse

NAME = "serve-teacher"
HELP = "serve a model as an opd teacher over HTTP (teacher.server=URL teacher.protocol=opd)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="teacher model: a local folder, a hub id or builtin:arith/teacher")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype (log-softmax is always computed in float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="padded positions per forward pass, and completion tokens merged across requests")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long to wait for more requests once one has arrived, in milliseconds")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch_tokens < 1 or args.batch_wait_ms < 0:
        raise ValueError("--max-batch-tokens must be >= 1 and --batch-wait-ms >= 0")
    from opd.serve.run import serve_teacher

    serve_teacher(args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
                  threads=args.threads, max_batch_tokens=args.max_batch_tokens,
                  batch_wait=args.batch_wait_ms / 1000.0, log_level=args.log_level,
                  on_ready=lambda url: print(f"opd serve-teacher: {args.model} at {url} "
                                             "(POST /v1/score; Ctrl-C stops)", flush=True))
    return 0
