"""``opd distill`` with every step slowed down by ``OPD_TEST_STEP_SLEEP`` seconds (default 0.5), so a
test can send a real signal to the process while a run is in progress.

    python tests/helpers/slow_distill.py [opd distill arguments ...]
"""

from __future__ import annotations

import os
import sys
import time

import opd.train as train
from opd.cli import main

_original = train.train_step


def _slow_step(parts, step):
    time.sleep(float(os.environ.get("OPD_TEST_STEP_SLEEP", "0.5")))
    return _original(parts, step)


if __name__ == "__main__":
    train.train_step = _slow_step
    sys.exit(main(["distill", *sys.argv[1:]]))
