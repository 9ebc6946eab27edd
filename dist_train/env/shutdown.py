"""Leaving a process without Python's interpreter teardown.

Once torch is imported, tearing the interpreter down (clearing some 3000 modules and the objects
they hold) takes 1-2.5 s per process on a small machine: paid at the very end of every rank of
every run, and by every restart. ``exit_process`` does what the interpreter's shutdown does that
matters, then ends the process at once.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``, as ``sys.exit(code)`` would, minus the module teardown.

    In the order of ``Py_FinalizeEx``: the threading module's exit hooks run (a
    ``ThreadPoolExecutor`` left open stops its workers) and every non-daemon thread is joined;
    then the atexit handlers run (logging flushes and closes its handlers, multiprocessing stops
    its children, MLflow ends its run); then stdout and stderr are flushed. Where this Python
    lacks ``threading._shutdown`` the process exits the ordinary way.
    """
    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None or threading.current_thread() is not threading.main_thread():
        sys.exit(code)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(code)
