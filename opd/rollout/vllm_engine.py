"""vLLM rollout engines: the student's completions sampled by vLLM, in process or on a server.

Both engines draw exactly what :func:`opd.rollout.generate.generate_rollouts` draws from: the
behaviour policy ``μ(·|s_t) = softmax(filter_top_p(filter_top_k(z(s_t) / τ)))`` (vLLM applies the
temperature, then top-k, then top-p with the rule of ``transformers``' warpers — drop the tokens
whose ascending cumulative mass is ``≤ 1 − top_p``, keep the most likely one), and record
``behaviour_logprobs_BT = log μ(y_t | s_t)`` read off vLLM's *processed* log-probs
(``logprobs_mode="processed_logprobs"``: after temperature and filtering). Greedy decoding takes the
argmax and records the untempered ``log_softmax(z)[y_t]``, as the hf engine does. A completion
stops after the first stop id (the tokenizer's EOS; vLLM's own EOS handling is off so that exactly
opd's stop ids apply), or after ``max_new_tokens``; rows are laid out as the hf engine lays them
out (``G`` adjacent rows per prompt, left-padded prompts, right-padded completions).

Randomness: every row gets its own vLLM seed drawn from torch's global generator, which the loop
seeds per step, so a step's rollouts are reproducible with the in-process engine (a server's
batching may differ between runs).

* :class:`VLLMEngine` — ``vllm.LLM`` in the training process (colocated). ``sync_weights`` pushes
  the live student's ``state_dict`` (a LoRA student's merged weights) with
  ``collective_rpc("reload_weights", weights_iterator=...)`` and clears the prefix cache (cached
  prompt KV was computed with the old weights).
* :class:`VLLMServerEngine` — a vLLM OpenAI-compatible server (``rollout.server``), started with
  ``--logprobs-mode processed_logprobs`` and ``VLLM_SERVER_DEV_MODE=1``: ``sync_weights`` writes the
  weights (:func:`write_weights`) under ``rollout.sync_dir`` and asks the server to reload them
  (``POST /collective_rpc`` ``reload_weights`` with ``weights_path``), then resets its prefix cache.

Weights are pushed every ``sync_every`` calls of ``sync_weights`` (the loop calls it once per step,
before sampling): with ``k > 1`` the rollouts come from weights up to ``k − 1`` updates old; the
recorded ``log μ`` lets route 2's importance ratio correct that lag.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opd.model_paths import resolve_model_path
from opd.rollout.generate import encode_prompts, finish_rollouts, stop_token_ids
from opd.tasks.base import Example
from opd.types import Rollouts

__all__ = ["ROTARY_RELOAD_FILTER", "VLLMEngine", "VLLMServerEngine", "engine_log_quieted", "import_vllm",
           "pushed_state", "sampling_args", "vllm_engine", "write_weights"]

_DOC = "docs/serving.md"
#: Environment variables through which a user takes charge of vLLM's own logging (then opd leaves it be).
_VLLM_LOGGING_VARS = ("VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_LEVEL", "VLLM_LOGGING_CONFIG_PATH")
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's ``"RotaryEmbedding: Failed to load weights"`` warning, which every in-place weight
    reload (``reload_weights``, once per push) logs although nothing is missing.

    Why it appears: when a reload ends, vLLM (``finalize_layerwise_processing``) looks at every module
    that owns tensors and warns for each one that received no element from the pushed weights.
    ``RotaryEmbedding`` owns one tensor, its ``cos_sin_cache`` — a table computed from the config
    (``rope_theta``, head size, positions), not a trained weight — and a Hugging Face ``state_dict``
    has no rotary entry (``inv_freq`` is a non-persistent buffer), so nothing is loaded into it and
    vLLM puts the existing table back (``_place_kernel_tensors``). The table depends only on the
    config, which a push never changes, so the warning is harmless; that every *trained* weight
    arrives is checked by ``tests/test_vllm.py``: after pushes of updated weights vLLM's greedy
    tokens equal the updated HF model's and its log-probs agree within 1e-4.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


#: The filter :func:`import_vllm` puts on vLLM's reload logger (filters survive vLLM's logging set-up).
ROTARY_RELOAD_FILTER = _RotaryReloadFilter()


def _quiet_vllm_logging() -> bool:
    """Before vLLM is imported: vLLM logs only errors (to stderr, one line each), not its warnings and
    INFO lines on stdout — unless the user set one of ``VLLM_CONFIGURE_LOGGING``,
    ``VLLM_LOGGING_LEVEL``, ``VLLM_LOGGING_CONFIG_PATH``. True when opd quieted it."""
    if any(var in os.environ for var in _VLLM_LOGGING_VARS) or "vllm" in sys.modules:
        return False
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM installs no handler and never resets these levels
    log = logging.getLogger("vllm")
    log.setLevel(logging.ERROR)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("vllm: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    return True


@contextmanager
def preload_kept() -> Iterator[None]:
    """Keep the process's ``LD_PRELOAD`` as it was while a ``vllm.LLM`` starts.

    vLLM's CPU platform sets ``LD_PRELOAD`` to torch's libgomp in ``os.environ`` for its worker processes;
    left there, every process opd starts afterwards (a sweep's runs, a served teacher) would load libgomp
    before opd sets its OpenMP wait policy (``opd.threads.set_openmp_defaults``) and spin-wait at
    libgomp's default. The workers, if any, have started when ``LLM`` returns; this process already runs."""
    before = os.environ.get("LD_PRELOAD")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = before


@contextmanager
def engine_log_quieted(enabled: bool = True) -> Iterator[None]:
    """While vLLM is imported and started, capture what it writes to the process's stdout and stderr —
    Python warnings, C++ warnings (NUMA binding, missing preload libraries), checkpoint-loading bars —
    at the file-descriptor level, and show it only if the start fails (then it explains the error).
    A no-op when ``enabled`` is False (the user configured vLLM's logging)."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", errors="replace"))
            sys.stderr.flush()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def import_vllm():
    """``vllm`` with the in-process engine (no child process) unless the caller chose otherwise; on a
    machine without a GPU the CPU KV cache defaults to 1 GiB. A clear error when it is missing.

    A run's terminal shows opd's progress, not vLLM's log: unless the user configured vLLM's logging
    (``VLLM_LOGGING_LEVEL=INFO`` shows it all), vLLM reports only errors, its import and start-up
    output is held back (:func:`engine_log_quieted`), and the per-push rotary warning is dropped
    (:data:`ROTARY_RELOAD_FILTER`).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    quiet = _quiet_vllm_logging()
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        with engine_log_quieted(quiet and "vllm" not in sys.modules):
            import vllm
    except ImportError as err:
        raise ImportError(
            f"rollout.engine=vllm needs vLLM ({err}); install it with `pip install -e \".[vllm]\"` (CPU) or the "
            f"vllm build for your GPU ({_DOC})"
        ) from err
    reload_log = logging.getLogger(_RELOAD_LOGGER)
    if ROTARY_RELOAD_FILTER not in reload_log.filters:
        reload_log.addFilter(ROTARY_RELOAD_FILTER)
    return vllm


def sampling_args(sampling, stop_ids: list[int], seed: int | None) -> dict[str, Any]:
    """vLLM sampling parameters that mean what ``sampling`` (:class:`opd.rollout.generate.Sampling`)
    means to the hf engine (module docstring)."""
    n_new = sampling.max_new_tokens if sampling.prefix_tokens is None else min(sampling.prefix_tokens,
                                                                                sampling.max_new_tokens)
    args: dict[str, Any] = {"max_tokens": int(n_new), "logprobs": 0, "stop_token_ids": list(stop_ids),
                            "ignore_eos": True, "skip_special_tokens": False}
    if sampling.greedy:
        args.update(temperature=0.0)
    else:
        args.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p),
                    top_k=int(sampling.top_k), seed=seed)
    return args


def pushed_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What a push sends to vLLM: ``(name, tensor)`` under the plain model's names, as vLLM loaded
    it. A plain student: its ``state_dict``. A LoRA student: the merged weights
    ``W + (α/r)·B A`` (:func:`opd.lora.merged_state_dict`) — its own ``state_dict`` holds
    ``…base_layer.weight`` / ``…lora_A…`` entries that vLLM's modules do not have."""
    from opd.lora import is_lora, merged_state_dict

    with torch.no_grad():
        state = merged_state_dict(model) if is_lora(model) else model.state_dict()
        return [(name, t.detach()) for name, t in state.items()]


def write_weights(model: nn.Module, sync_dir: str | os.PathLike) -> Path:
    """The model's full ``state_dict`` as ``<sync_dir>/opd-weights/model.safetensors`` (+ ``config.json``),
    replaced atomically; returns that folder.

    Every entry is written, tied ones included: ``save_pretrained`` drops ``lm_head.weight`` when it
    is tied to the embedding, and vLLM's CPU backend keeps a separate (repacked) output layer that is
    then left stale (measured: greedy completions diverge from the updated model's). A LoRA student's
    weights are written merged (:func:`pushed_state`).
    """
    from safetensors.torch import save_file

    folder = Path(sync_dir) / "opd-weights"
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: t.to("cpu").clone().contiguous() for name, t in pushed_state(model)}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    config = getattr(model, "config", None)
    if config is not None:
        config.to_json_file(str(folder / "config.json"))
    return folder


def _check_sampling(sampling) -> None:
    if not sampling.greedy and not sampling.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {sampling.temperature}; use greedy for argmax decoding")
    if not 0 < sampling.top_p <= 1 or sampling.top_k < 0:
        raise ValueError(f"top_p must be in (0, 1] and top_k >= 0, got {sampling.top_p}, {sampling.top_k}")
    if sampling.max_new_tokens < 1 or sampling.samples_per_prompt < 1:
        raise ValueError("max_new_tokens and samples_per_prompt must be >= 1")


class _Layout:
    """The prompts of a batch as the hf engine lays them out, and each row's unpadded ids."""

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, g: int):
        if not examples:
            raise ValueError("no examples: pass at least one Example")
        self.prompt_ids, self.prompt_mask = encode_prompts(tokenizer, [e.prompt for e in examples])
        rows = [ids[m.bool()].tolist() for ids, m in zip(self.prompt_ids, self.prompt_mask)]
        self.row_prompts = [r for r in rows for _ in range(g)]

    def rollouts(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, tokens: list[list[int]],
                 logprobs: list[list[float]], stop_ids: list[int], sampling, group_offset: int) -> Rollouts:
        """Completions (one list per row) padded into the hf engine's layout (masks, truncation)."""
        width = max(1, max(len(t) for t in tokens))
        pad = int(tokenizer.pad_token_id)
        tokens_BT = torch.full((len(tokens), width), pad, dtype=torch.long)
        logprobs_BT = torch.zeros((len(tokens), width), dtype=torch.float32)
        for i, (t, lp) in enumerate(zip(tokens, logprobs)):
            if len(t) != len(lp):
                raise ValueError(f"row {i}: {len(t)} tokens but {len(lp)} log-probs from vLLM")
            tokens_BT[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            logprobs_BT[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        return finish_rollouts(examples, tokenizer, (self.prompt_ids, self.prompt_mask), (tokens_BT, logprobs_BT),
                               stop_ids, sampling, group_offset=group_offset)


def _row_seeds(n: int, greedy: bool) -> list[int | None]:
    """One vLLM seed per row from torch's global generator (seeded per step by the loop)."""
    if greedy:
        return [None] * n
    return [int(s) for s in torch.randint(0, 2**31 - 1, (n,)).tolist()]


class _SyncCounter:
    """Push on the first call, then on every ``every``-th call."""

    def __init__(self, every: int):
        if every < 1:
            raise ValueError(f"sync_every must be >= 1, got {every}")
        self.every = every
        self.calls = 0
        self.pushes = 0

    def due(self) -> bool:
        due = self.pushes == 0 or self.calls % self.every == 0
        self.calls += 1
        return due


class VLLMEngine:
    """A ``vllm.LLM`` in the training process (module docstring).

    Args:
        model_path: a folder or hub id vLLM loads the student's architecture (and initial weights) from.
        tokenizer: the student's tokenizer (prompts are encoded here; vLLM only sees token ids).
        sync_every: push weights every ``k`` calls of :meth:`sync_weights`.
        memory: vLLM's ``gpu_memory_utilization`` (on CPU: the share of RAM).
        max_model_len: longest prompt + completion (None: the model's limit).
        dtype: parameter dtype in vLLM.
        seed: vLLM's own seed (rows are seeded individually anyway).
        tokenizer_path: where vLLM loads the tokenizer from (default: ``model_path``); it only sees
            token ids, but loads one for its own warm-up.
        llm: an existing ``vllm.LLM`` to use (tests share one across engines).
    """

    name = "vllm"
    sampling_module = None  # samples in vLLM, not from an in-process module

    def __init__(self, model_path: str, tokenizer: PreTrainedTokenizerBase, *, sync_every: int = 1,
                 memory: float = 0.1, max_model_len: int | None = None, dtype: str = "float32", seed: int = 0,
                 tokenizer_path: str | None = None, llm: Any = None):
        self.tokenizer = tokenizer
        self.sync = _SyncCounter(sync_every)
        vllm = import_vllm()
        self._vllm = vllm
        if llm is None:
            kwargs: dict[str, Any] = dict(model=str(model_path), dtype=dtype, seed=seed, gpu_memory_utilization=memory,
                                          enforce_eager=True, logprobs_mode="processed_logprobs")
            if tokenizer_path is not None:
                kwargs["tokenizer"] = str(tokenizer_path)
            if max_model_len is not None:
                kwargs["max_model_len"] = max_model_len
            threads = torch.get_num_threads()
            with engine_log_quieted(logging.getLogger("vllm").level >= logging.ERROR), preload_kept():
                llm = vllm.LLM(**kwargs, use_tqdm_on_load=False)
            if torch.get_num_threads() != threads:  # vLLM's CPU worker may lower the process's threads
                torch.set_num_threads(threads)
        mode = getattr(getattr(llm.llm_engine, "model_config", None), "logprobs_mode", "processed_logprobs")
        if mode != "processed_logprobs":
            raise ValueError(f"the vLLM engine records {mode}, not processed_logprobs: its log-probs would not be "
                             "log μ; build vllm.LLM(..., logprobs_mode='processed_logprobs')")
        self.llm = llm

    def generate(self, examples: Sequence[Example], sampling, *, group_offset: int = 0) -> Rollouts:
        _check_sampling(sampling)
        g = sampling.samples_per_prompt
        layout = _Layout(examples, self.tokenizer, g)
        stop_ids = stop_token_ids(self.tokenizer)
        seeds = _row_seeds(len(layout.row_prompts), sampling.greedy)
        params = [self._vllm.SamplingParams(detokenize=False, **sampling_args(sampling, stop_ids, s)) for s in seeds]
        prompts = [{"prompt_token_ids": p} for p in layout.row_prompts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        tokens, logprobs = [], []
        for out in outputs:
            o = out.outputs[0]
            tokens.append(list(o.token_ids))
            logprobs.append([float(step[tok].logprob) for tok, step in zip(o.token_ids, o.logprobs)])
        return layout.rollouts(examples, self.tokenizer, tokens, logprobs, stop_ids, sampling, group_offset)

    def sync_weights(self, model: nn.Module) -> None:
        if not self.sync.due():
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pushed_state(model))})
        self.llm.reset_prefix_cache()
        self.sync.pushes += 1

    def close(self) -> None:
        self.llm = None


class VLLMServerEngine:
    """Rollouts from a vLLM OpenAI-compatible server (module docstring).

    Args:
        client: a :class:`~opd.serve.client.ServiceClient` of the server.
        tokenizer: the student's tokenizer.
        sync_every: push weights every ``k`` calls of :meth:`sync_weights`.
        sync_dir: a folder the server can read, for the weights (default: a temporary folder here).
        model: the served model's name (default: the first of ``GET /v1/models``).
        concurrency: requests in flight at once (one per rollout row).
    """

    name = "vllm"
    sampling_module = None  # samples in vLLM, not from an in-process module

    def __init__(self, client, tokenizer: PreTrainedTokenizerBase, *, sync_every: int = 1,
                 sync_dir: str | os.PathLike | None = None, model: str | None = None, concurrency: int = 32):
        self.client = client
        self.tokenizer = tokenizer
        self.sync = _SyncCounter(sync_every)
        self._tmp = None
        if sync_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="opd-vllm-weights-")
            sync_dir = self._tmp.name
        self.sync_dir = Path(sync_dir)
        self.model = model
        self.concurrency = concurrency
        self._checked = False

    def _model_name(self) -> str:
        if self.model is None:
            self.model = self.client.get("/v1/models", lambda body: str(body["data"][0]["id"]))
        return self.model

    def _check_logprobs_mode(self, prompt: list[int]) -> None:
        """A one-token top-k=1 probe: under processed log-probs the only kept token has log-prob 0."""
        from opd.serve.client import BadAnswer

        def lp(body: Any) -> float:
            values = body["choices"][0]["logprobs"]["token_logprobs"]
            if not values or values[0] is None:
                raise BadAnswer("the probe's token_logprobs is empty or null")
            return float(values[0])

        got = self.client.post("/v1/completions", {"model": self._model_name(), "prompt": [prompt], "max_tokens": 1,
                                                   "temperature": 1.0, "top_k": 1, "logprobs": 0, "seed": 0,
                                                   "ignore_eos": True}, lp)
        if abs(got) > 1e-6:
            raise ValueError(f"the vLLM rollout server {self.client.url} returns raw log-probs (a top-k=1 sample has "
                             f"log-prob {got:.4g}, not 0), so behaviour log-probs would not be log μ; start it with "
                             f"--logprobs-mode processed_logprobs ({_DOC})")
        self._checked = True

    def generate(self, examples: Sequence[Example], sampling, *, group_offset: int = 0) -> Rollouts:
        from concurrent.futures import ThreadPoolExecutor

        from opd.serve.client import BadAnswer

        _check_sampling(sampling)
        g = sampling.samples_per_prompt
        layout = _Layout(examples, self.tokenizer, g)
        if not self._checked:
            self._check_logprobs_mode(layout.row_prompts[0])
        stop_ids = stop_token_ids(self.tokenizer)
        seeds = _row_seeds(len(layout.row_prompts), sampling.greedy)
        n_new = sampling_args(sampling, stop_ids, None)["max_tokens"]

        def parse(body: Any) -> tuple[list[int], list[float]]:
            choice = body["choices"][0]
            ids = [int(i) for i in choice["token_ids"]]
            lps = choice["logprobs"]["token_logprobs"]
            if not ids or len(ids) > n_new or len(lps) != len(ids):
                raise BadAnswer(f"{len(ids)} token ids and {len(lps)} log-probs for max_tokens={n_new}")
            values = [float(x) for x in lps]
            if any(v != v or v > 1e-3 for v in values):
                raise BadAnswer("token_logprobs holds NaN or positive log-probs")
            return ids, values

        def one(row: tuple[list[int], int | None]) -> tuple[list[int], list[float]]:
            prompt, seed = row
            body = {"model": self._model_name(), "prompt": [prompt], "return_token_ids": True,
                    **sampling_args(sampling, stop_ids, seed)}
            return self.client.post("/v1/completions", {k: v for k, v in body.items() if v is not None}, parse)

        # one request per row, several in flight: each row has its own seed (a seed shared by a
        # multi-prompt request would correlate the rows), and the server batches what is in flight
        rows = list(zip(layout.row_prompts, seeds))
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(rows))) as pool:
            results = list(pool.map(one, rows))
        tokens = [ids for ids, _ in results]
        logprobs = [lps for _, lps in results]
        return layout.rollouts(examples, self.tokenizer, tokens, logprobs, stop_ids, sampling, group_offset)

    def sync_weights(self, model: nn.Module) -> None:
        if not self.sync.due():
            return
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        from opd.serve.client import ServiceRejected

        folder = write_weights(model, self.sync_dir)
        try:
            self.client.post("/collective_rpc", {"method": "reload_weights",
                                                 "kwargs": {"weights_path": str(folder.resolve())}})
            self.client.post("/reset_prefix_cache", None)
        except ServiceRejected as err:
            if err.status == 404:
                raise ValueError(f"the vLLM rollout server {self.client.url} does not accept weight reloads "
                                 "(POST /collective_rpc: 404); start it with VLLM_SERVER_DEV_MODE=1 "
                                 f"({_DOC})") from None
            raise
        self.sync.pushes += 1

    def close(self) -> None:
        self.client.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def vllm_engine(cfg, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> VLLMEngine | VLLMServerEngine:
    """``rollout.engine=vllm``: the server at ``rollout.server``, else a colocated ``vllm.LLM`` loaded
    from the student's checkpoint (the loop pushes the live weights before the first rollout)."""
    r = cfg.rollout
    if r.server:
        from opd.serve.client import ServiceClient

        client = ServiceClient(r.server, role="rollout server", timeout=r.server_timeout, retries=r.server_retries)
        return VLLMServerEngine(client, tokenizer, sync_every=r.sync_every, sync_dir=r.sync_dir)
    return VLLMEngine(resolve_model_path(cfg.student.model), tokenizer, sync_every=r.sync_every,
                      memory=r.vllm_memory, max_model_len=r.vllm_max_model_len, dtype=cfg.student.dtype,
                      seed=cfg.seed,
                      tokenizer_path=resolve_model_path(cfg.student.tokenizer) if cfg.student.tokenizer else None)
