"""Teacher scoring throughput: the teacher in the training process vs behind a server.

    python bench/teacher_serving.py              # demo and large pairs (bench/end_to_end.py), writes results.md
    python bench/teacher_serving.py --quick      # demo pair, fewer rounds, prints only
    python bench/teacher_serving.py --payloads   # hidden-state vs log-prob payloads: bytes/token, step time
                                                 # (bench/teacher_payloads.py; demo, large and real pairs)

For each pair, one batch of the student's rollouts (the pair's prompts per step, temperature 1) is
scored by

* ``in-process`` — :class:`opd.teachers.ModelTeacher` in this process;
* ``opd fp32`` / ``opd fp16`` — ``opd serve-teacher`` in its own process (``--threads`` as this
  process), reached through :class:`opd.teachers.served.ServedTeacher` (protocol ``opd``; answer
  log-probs as float32 / float16);
* ``vllm`` — vLLM's OpenAI-compatible server in its own process (``--max-logprobs 32``), through
  the ``vllm`` protocol;

at each access level the pair allows (sampled-token, top-32, and full for the demo's 17-token
vocabulary). Scored tokens/s = completion tokens / wall seconds of ``score()``, median over
``--reps`` calls after ``--warmup``; the variants alternate within each round. Bytes per token =
the request + answer JSON the ``opd`` protocol sends for that batch, over its completion tokens.

Both sides share this machine's two cores: the client mostly waits while the server computes,
so the comparison shows what the HTTP hop and serialisation cost, not what a separate GPU server
would gain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from end_to_end import PAIRS, model_paths  # noqa: E402

DATA = common.ROOT / "bench" / "data" / "teacher_serving.json"


def measure_pair(pair: str, folder: Path, reps: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    import psutil
    import torch

    from opd.models import load_model, load_tokenizer
    from opd.rollout import Sampling, generate_rollouts, lm_head_vocab_size
    from opd.serve.client import ServiceClient
    from opd.serve.payload import ScoreRequest
    from opd.tasks.arith import ArithTask
    from opd.teachers import ModelTeacher
    from opd.teachers.served import ServedTeacher, rollout_sequences
    from opd.teachers.served_backends import OPDBackend, VLLMBackend

    torch.set_num_threads(threads)
    spec = PAIRS[pair]
    s_path, t_path = model_paths(pair, folder)
    tok = load_tokenizer(s_path)
    student = load_model(s_path)
    vocab = lm_head_vocab_size(student)
    examples = ArithTask(digits=3, eval_size=8, seed=0).train_examples(0, spec["prompts"], 0)
    torch.manual_seed(0)
    rollouts = generate_rollouts(student, tok, examples, Sampling(max_new_tokens=spec["max_new_tokens"]))
    n_tokens = float(rollouts.completion_mask_BT.sum())
    del student

    logs = folder / f"logs-{pair}"
    logs.mkdir(exist_ok=True)
    opd_port, vllm_port = common.free_port(), common.free_port()
    procs = [
        common.start_server([sys.executable, "-m", "opd.cli", "serve-teacher", t_path, "--port", str(opd_port),
                             "--threads", str(threads)], {}, logs / "opd.log"),
        common.start_server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", t_path, "--port",
                             str(vllm_port), "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.1",
                             "--max-logprobs", "32"],
                            {"VLLM_CPU_KVCACHE_SPACE": "1"}, logs / "vllm.log"),
    ]
    try:
        start_s = {"opd": common.wait_server(f"http://127.0.0.1:{opd_port}", procs[0], logs / "opd.log"),
                   "vllm": common.wait_server(f"http://127.0.0.1:{vllm_port}", procs[1], logs / "vllm.log")}

        def client(port: int) -> ServiceClient:
            return ServiceClient(f"http://127.0.0.1:{port}", role="teacher server", timeout=600, retries=0)

        teachers = {
            "in-process": ModelTeacher(load_model(t_path), tok),
            "opd fp32": ServedTeacher(OPDBackend(client(opd_port), tok, vocab_size=vocab), tok, vocab_size=vocab),
            "opd fp16": ServedTeacher(OPDBackend(client(opd_port), tok, dtype="float16", vocab_size=vocab), tok,
                                      vocab_size=vocab),
            "vllm": ServedTeacher(VLLMBackend(client(vllm_port), tok, vocab_size=vocab), tok, vocab_size=vocab),
        }
        prompts, completions = rollout_sequences(rollouts, tok)
        accesses = [("sampled", 1), ("topk", min(32, vocab // 2))] + ([("full", vocab)] if vocab <= 32 else [])
        servers = [psutil.Process(proc.pid) for proc in procs]

        def server_cpu() -> float:  # CPU seconds of the server processes and their children (vLLM's engine core)
            total = 0.0
            for proc in servers:
                for q in [proc, *proc.children(recursive=True)]:
                    try:
                        t = q.cpu_times()
                        total += t.user + t.system
                    except psutil.Error:
                        pass
            return total

        rows = []
        for access, k in accesses:
            times: dict[str, list[float]] = {name: [] for name in teachers}
            busy: dict[str, list[float]] = {name: [] for name in teachers}
            for r in range(warmup + reps):
                for name, teacher in teachers.items():
                    cpu0 = server_cpu()
                    with common.Neighbours() as nb:
                        tic = time.perf_counter()
                        teacher.score(rollouts, access=access, topk=k)
                        dt = time.perf_counter() - tic
                    if r >= warmup:
                        times[name].append(dt)
                        # the servers are this benchmark's own processes: their CPU is not "others"
                        busy[name].append(max(0.0, nb.busy - (server_cpu() - cpu0) / (dt * (os.cpu_count() or 1))))
            for name in teachers:
                row = {"pair": pair, "access": access, "k": 0 if access == "sampled" else k, "variant": name,
                       "tokens": n_tokens, "median_s": statistics.median(times[name]),
                       "tokens_per_s": n_tokens / statistics.median(times[name]),
                       "neighbours_busy": statistics.median(busy[name]), "server_start_s": None, "bytes_per_token": None}
                if name.startswith("opd"):
                    dtype = "float16" if name.endswith("fp16") else "float32"
                    ask = vocab if access == "full" else (k if access == "topk" else 0)
                    req = ScoreRequest(prompts=prompts, completions=completions, topk=ask, dtype=dtype)
                    answer = teachers[name].backend.score(prompts, completions, ask)
                    size = len(json.dumps(req.to_json())) + len(json.dumps(answer.to_json(dtype)))
                    row.update(bytes_per_token=size / n_tokens, server_start_s=start_s["opd"])
                if name == "vllm":
                    row["server_start_s"] = start_s["vllm"]
                rows.append(row)
        return rows
    finally:
        common.stop_servers(procs)


def render(rows: list[dict[str, Any]], command: str, when: str) -> str:
    table = []
    for row in rows:
        base = next(r for r in rows if r["variant"] == "in-process" and r["pair"] == row["pair"]
                    and r["access"] == row["access"])
        access = row["access"] if row["access"] == "sampled" else f"{row['access']} (k={row['k']})"
        if row["access"] == "full":
            access = f"full (V={row['k']})"
        table.append([row["pair"], access, row["variant"], f"{row['tokens']:.0f}", common.fmt_s(row["median_s"]),
                      f"{row['tokens_per_s']:,.0f}", f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}×",
                      "–" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:,.0f}",
                      f"{row['neighbours_busy']:.0%}"])
    starts = sorted({(r["pair"], r["variant"].split()[0], r["server_start_s"]) for r in rows
                     if r["server_start_s"] is not None})
    return "\n".join([
        "## Teacher scoring: in process vs served (bench/teacher_serving.py)",
        "",
        f"`{command}` — {when}; one rollout batch of the pair's student (prompts per step of bench/end_to_end.py, "
        "temperature 1), scored by the teacher in this process, by `opd serve-teacher` (protocol `opd`, answer "
        "log-probs fp32 or fp16) and by vLLM's OpenAI server (protocol `vllm`, `prompt_logprobs`), each server "
        "in its own process on the same two cores. Median of the rounds, variants alternating within each "
        "round; bytes per token = request + answer JSON of the `opd` protocol.",
        "",
        common.md_table(["pair", "access", "teacher", "tokens", "median s", "tokens/s", "vs in-process",
                         "bytes/token", "CPU used by others"], table),
        "",
        "Server start-up (process start to `/health`): "
        + "; ".join(f"{p} {v} {common.fmt_s(s)} s" for p, v, s in starts) + ".",
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--payloads" in argv:  # what each payload costs per training step (bench/teacher_payloads.py)
        import teacher_payloads

        return teacher_payloads.main([x for x in argv if x != "--payloads"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="demo pair, 2 rounds; prints only")
    p.add_argument("--no-write", action="store_true")
    common.add_machine_args(p)
    a = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in (["demo"] if a.quick else a.pairs.split(",")):
            if pair not in PAIRS:
                p.error(f"unknown pair {pair!r}; choose from {sorted(PAIRS)}")
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout)
            rows += measure_pair(pair, Path(tmp), 2 if a.quick else a.reps, 1 if a.quick else a.warmup, a.threads)
    text = render(rows, common.command_line(), common.stamp())
    print(text)
    if not (a.quick or a.no_write):
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps({"when": common.stamp(), "machine": common.machine_info(), "rows": rows}, indent=1))
        common.write_section("teacher_serving", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
