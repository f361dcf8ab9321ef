"""Shared test setup: deterministic, offline, CPU."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


#: torch's thread count when the session starts; every test starts and ends with it
_THREADS = torch.get_num_threads()
#: LD_PRELOAD when the session starts: vLLM's CPU platform points it at torch's libgomp in os.environ, and
#: the processes later tests start would inherit it (libgomp loaded before opd sets its wait policy)
_PRELOAD = os.environ.get("LD_PRELOAD")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
    # a run's ThreadGovernor lowers the count on a busy machine (by design); the next test, and the
    # session's in-process vLLM engines (whose CPU attention checks the count it started with), must
    # not inherit that (torch's own setter: vLLM replaces torch.set_num_threads with a no-op; a vLLM engine
    # called from another thread, such as the tests' stand-in servers, plans with the global count)
    if torch.get_num_threads() != _THREADS:
        torch._C.set_num_threads(_THREADS)
    if os.environ.get("LD_PRELOAD") != _PRELOAD:
        if _PRELOAD is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = _PRELOAD


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory):
    """The real pretrained pair (SmolLM2-135M-Instruct and a pruned copy), built once per session;
    skipped with the install line when its packages are missing (tests/helpers/real_pair.py)."""
    from tests.helpers.real_pair import build, missing

    why = missing()
    if why is not None:
        pytest.skip(why)
    return build(tmp_path_factory.mktemp("real_pair"))


# In-process vLLM engines change the process for good (torch.set_num_threads no longer takes effect; in
# one suite run, thread, signal and resumption tests that ran after them failed): the tests that start
# one are in test_vllm*.py, which sort after those.
@pytest.fixture(scope="session")
def real_student_llm(real_pair):
    """An in-process vLLM engine of the real pair's student (started once, ~20 s on 2 busy cores).
    Tests that push weights to it push the initial student back when they end."""
    if importlib.util.find_spec("vllm") is None:  # not imported here: opd quiets vLLM's logging before its import
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    from tests.helpers.real_pair import start_llm

    return start_llm(real_pair.student_dir)


@pytest.fixture(scope="session")
def real_teacher_llm(real_pair):
    """An in-process vLLM engine of the real teacher (never pushed to)."""
    if importlib.util.find_spec("vllm") is None:  # not imported here: opd quiets vLLM's logging before its import
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    from tests.helpers.real_pair import start_llm

    return start_llm(real_pair.teacher_dir)
