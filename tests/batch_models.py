"""A model for the batch's tests whose construction kills the process it runs in when that process is a Dask
worker (as an out-of-memory kill would end it); elsewhere it is tests.models' model of that name."""
from __future__ import annotations

import os
import signal

from tests import models


def build_killing_its_worker(name: str = "mlp"):
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):  # not in a Dask worker: the flow's own parameter check
        return models.build(name)
    os.kill(os.getpid(), signal.SIGKILL)
