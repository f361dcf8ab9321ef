"""Rollout throughput of the two engines: opd's own decode loop (``rollout.engine=hf``) vs vLLM in the
training process (``rollout.engine=vllm``), on the same student, prompts and sampling settings.

    python bench/rollout_engines.py              # demo and large pairs (bench/end_to_end.py), writes results.md
    python bench/rollout_engines.py --pairs real --neighbour both   # the real pair, alone and beside a busy process
    python bench/rollout_engines.py --quick      # one small cell, prints only

For each cell (pair, prompts × G samples, max_new_tokens, temperature 1): both engines generate
the same batch alternately (``--warmup`` then ``--reps`` rounds, each round seeded alike), so both
see the same machine conditions; tokens/s = completion tokens (EOS included) / wall seconds of the
call, median over the rounds. The ``real`` pair (SmolLM2-135M-Instruct's uniform 20-of-30-layer prune,
bench/end_to_end.py) samples chat_basics questions in its chat template; the others arith prompts.
``--neighbour on`` runs every measurement beside a second process that keeps one core busy (a
one-thread float32 matrix-multiply loop, started before the engines are timed and stopped after);
``both`` measures each cell alone and then beside it, so the two slowdowns compare within one run.
Also timed: ``sync_weights`` of the vLLM engine (pushing the
student's whole ``state_dict`` after an optimizer step), which the hf engine does not need.

The vLLM engine runs with the settings of docs/serving.md for CPUs: in process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``VLLM_CPU_KVCACHE_SPACE=1``, ``gpu_memory_utilization=0.1``,
eager mode, fp32, the same torch thread count as the hf engine, and opd's OpenMP settings (a short
``GOMP_SPINCOUNT``, :mod:`opd.threads`), as ``opd distill`` runs them.
"""

from __future__ import annotations

import argparse
import json
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

DATA = common.ROOT / "bench" / "data" / "rollout_engines.json"
CELLS = {"demo": [(128, 1, 8)], "large": [(16, 1, 64), (16, 4, 64)],
         "real": [(16, 1, 24), (16, 4, 24)]}  # (prompts, G, max_new_tokens)
NEIGHBOUR = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


class BusyNeighbour:
    """``with BusyNeighbour(on):`` a second Python process that keeps one core busy (when ``on``)."""

    def __init__(self, on: bool):
        self.on = on
        self.proc: Any = None

    def __enter__(self) -> "BusyNeighbour":
        if self.on:
            import subprocess

            self.proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
            time.sleep(2.0)  # let it load torch and start multiplying
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def bench_examples(pair: str, tokenizer: Any, prompts: int) -> list[Any]:
    """The prompts of a cell: chat_basics questions in the chat template (``real``), else arith."""
    if pair == "real":
        from opd.tasks.chat_basics import ChatBasicsTask

        return ChatBasicsTask(tokenizer).train_examples(0, prompts, 0)
    from opd.tasks.arith import ArithTask

    return ArithTask(digits=3, eval_size=8, seed=0).train_examples(0, prompts, 0)


def measure_pair(pair: str, folder: Path, cells: list[tuple[int, int, int]], reps: int, warmup: int,
                 threads: int, neighbours: tuple[bool, ...] = (False,)) -> list[dict[str, Any]]:
    import torch

    from opd.models import load_model, load_tokenizer
    from opd.rollout.engine import HFEngine, Sampling
    from opd.rollout.vllm_engine import VLLMEngine
    torch.set_num_threads(threads)
    s_path, _ = model_paths(pair, folder)
    tok = load_tokenizer(s_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = load_model(s_path)
    t0 = time.perf_counter()
    vllm_engine = VLLMEngine(s_path, tok)
    vllm_start = time.perf_counter() - t0
    torch.set_num_threads(threads)
    engines = {"hf": HFEngine(model, tok), "vllm": vllm_engine}
    rows = []
    for neighbour in neighbours:
        with BusyNeighbour(neighbour):
            for prompts, g, max_new in cells:
                rows += measure_cell(engines, bench_examples(pair, tok, prompts),
                                     Sampling(max_new_tokens=max_new, samples_per_prompt=g, temperature=1.0),
                                     reps, warmup)
                for row in rows[-len(engines):]:
                    row.update(pair=pair, prompts=prompts, G=g, max_new_tokens=max_new, neighbour=neighbour)
    sync = common.time_calls(lambda: (vllm_engine.sync.__setattr__("pushes", 0), vllm_engine.sync_weights(model)),
                             reps=reps, warmup=1)
    params = sum(p.numel() for p in model.parameters())
    for row in rows:
        row.update(vllm_start_s=vllm_start, sync_median_s=sync["median_s"], student_params=params)
    return rows


def measure_cell(engines: dict[str, Any], examples: list[Any], sampling: Any, reps: int,
                 warmup: int) -> list[dict[str, Any]]:
    """Both engines on one batch, alternating within each round; one row per engine."""
    import torch

    times: dict[str, list[float]] = {k: [] for k in engines}
    rates: dict[str, list[float]] = {k: [] for k in engines}
    busy: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(warmup + reps):
        for name, engine in engines.items():
            torch.manual_seed(r)
            with common.Neighbours() as nb:
                tic = time.perf_counter()
                out = engine.generate(examples, sampling)
                dt = time.perf_counter() - tic
            if r >= warmup:
                times[name].append(dt)
                rates[name].append(float(out.completion_mask_BT.sum()) / dt)
                busy[name].append(nb.busy)
    return [{"engine": name, "median_s": statistics.median(times[name]),
             "tokens_per_s": statistics.median(rates[name]), "neighbours_busy": statistics.median(busy[name])}
            for name in engines]


def _twin(rows: list[dict[str, Any]], row: dict[str, Any], **change: Any) -> dict[str, Any] | None:
    """The row of the same cell as ``row`` with the keys in ``change`` set otherwise (None if not measured)."""
    want = {**{k: row.get(k) for k in ("pair", "prompts", "G", "max_new_tokens", "neighbour", "engine")}, **change}
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items())), None)


def _slowdowns(rows: list[dict[str, Any]]) -> list[str]:
    """Lines 'beside a busy process, engine X takes k× its time alone' for cells measured both ways."""
    lines = []
    for row in rows:
        alone = _twin(rows, row, neighbour=False) if row.get("neighbour") else None
        if alone is not None:
            lines.append(f"- {row['pair']} {row['prompts']}×{row['G']}, {row['engine']}: beside a busy process "
                         f"{row['median_s'] / alone['median_s']:.2f}× its time alone")
    if lines:
        lines = ["Slowdown beside a second process that keeps one core busy (`--neighbour both`; same run):", "",
                 *lines, ""]
    return lines


def render(rows: list[dict[str, Any]], command: str, when: str) -> str:
    table = []
    for row in rows:
        if row["engine"] != "vllm":
            continue
        hf = _twin(rows, row, engine="hf")
        for r in (hf, row):
            table.append([r["pair"], f"{r['prompts']}×{r['G']}", r["max_new_tokens"],
                          "busy" if r.get("neighbour") else "none", r["engine"],
                          common.fmt_s(r["median_s"]), f"{r['tokens_per_s']:,.0f}",
                          f"{row['tokens_per_s'] / hf['tokens_per_s']:.2f}×" if r is row else "1.00×",
                          f"{r['neighbours_busy']:.0%}"])
    syncs = {r["pair"]: r for r in rows}
    sync_rows = [[p, f"{r['student_params'] / 1e6:.2f} M", common.fmt_s(r["vllm_start_s"]), common.fmt_s(r["sync_median_s"])]
                 for p, r in syncs.items()]
    return "\n".join([
        "## Rollout engines: hf vs vLLM (bench/rollout_engines.py)",
        "",
        f"`{command}` — {when}; temperature 1, full vocabulary; median of the rounds, the two engines "
        "alternating within each round. tokens/s counts completion tokens (EOS included). The vLLM engine "
        "is the in-process one (`rollout.engine=vllm`, vllm-cpu 0.32, eager, fp32).",
        "",
        common.md_table(["pair", "prompts × G", "max new", "neighbour", "engine", "median s", "tokens/s", "vs hf",
                         "CPU used by others"], table),
        "",
        *_slowdowns(rows),
        "Weight sync (`sync_weights`: the student's whole `state_dict` into vLLM with `reload_weights`, then "
        "the prefix cache reset), once per optimizer step with `rollout.sync_every=1`; and the engine's start-up:",
        "",
        common.md_table(["pair", "student params", "vLLM start s", "sync s"], sync_rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="demo,large")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="demo pair, 32 prompts, 2 rounds; prints only")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--neighbour", choices=("off", "on", "both"), default="off",
                   help="measure beside a second process that keeps one core busy (both: alone, then beside it)")
    common.add_machine_args(p)
    a = p.parse_args(argv)
    from opd.threads import set_openmp_defaults

    set_openmp_defaults()  # the short OpenMP spin `opd distill` runs with (opd.threads), before torch loads
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for pair in a.pairs.split(","):
            if pair not in PAIRS:
                p.error(f"unknown pair {pair!r}; choose from {sorted(PAIRS)}")
            cells = [(32, 1, 8)] if a.quick else CELLS[pair]
            common.wait_for_quiet(a.quiet_busy, a.quiet_timeout)
            rows += measure_pair(pair, Path(tmp), cells, 2 if a.quick else a.reps, 1 if a.quick else a.warmup,
                                 a.threads, {"off": (False,), "on": (True,), "both": (False, True)}[a.neighbour])
            if a.quick:
                break
    text = render(rows, common.command_line(), common.stamp())
    print(text)
    if not (a.quick or a.no_write):
        real = a.pairs == "real"  # the real pair keeps its own section and data file beside the others
        data = DATA.with_name("rollout_engines_real.json") if real else DATA
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps({"when": common.stamp(), "machine": common.machine_info(), "rows": rows}, indent=1))
        common.write_section("rollout_engines_real" if real else "rollout_engines", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
