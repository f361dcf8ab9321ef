"""Start the teacher server: load a model and tokenizer, build the app, run it under uvicorn."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["load_teacher", "serve_teacher"]


def load_teacher(model: str, *, dtype: str = "float32", device: str = "cpu"):
    """``(model, tokenizer)`` for ``model`` (a folder, a hub id or ``builtin:arith/teacher``)."""
    from opd.model_paths import resolve_model_path
    from opd.models import load_model, load_tokenizer

    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    return load_model(path, dtype=dtype, device=device), tokenizer


def serve_teacher(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "float32",
                  device: str = "cpu", threads: int | None = None, max_batch_tokens: int = 16384,
                  batch_wait: float = 0.005, log_level: str = "warning",
                  on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``model`` at ``http://host:port`` until interrupted (blocks)."""
    import torch
    import uvicorn

    from opd.serve.app import build_app

    if threads:
        torch.set_num_threads(threads)
    net, tokenizer = load_teacher(model, dtype=dtype, device=device)
    app = build_app(net, tokenizer, name=model, max_batch_tokens=max_batch_tokens, batch_wait=batch_wait)
    if on_ready is not None:
        on_ready(f"http://{host}:{port}")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
