"""What the test launchers share: run a module or script as `python` would, and end an FSDP process safely.

Kept free of torch and Accelerate imports, so that a test can run it in a bare subprocess.
"""

import atexit
import os
import runpy
import sys
from typing import NoReturn


def run_as_main(argv: list[str]) -> None:
    """Run `-m module args...` or `script.py args...` as `__main__`, as `python` would."""
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # the script's folder first, as `python script.py`
        runpy.run_path(argv[0], run_name="__main__")


def run_then_exit(argv: list[str]) -> NoReturn:
    """`run_as_main(argv)`, then end the process with the status `python` would give it, after its exit handlers and
    with its output flushed, but without the interpreter's finalization. An exception other than SystemExit propagates
    as usual.

    Why: under FSDP2 on gloo, torch 2.14's DTensor caches keep the device mesh's process group alive past
    `destroy_process_group`, so its gloo worker threads outlive the run. A worker that drops the last reference to a
    finished all-gather (held by a barrier that was enqueued while the all-gather was still in flight) frees tensors
    whose Python objects torch then releases under the GIL; once the interpreter is finalizing, Python ends a thread
    that asks for the GIL with a forced unwind, which aborts the process in that C++ destructor ("terminate called
    without an active exception"; backtrace: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork ->
    ~AsyncAllgatherCoalescedWork -> TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread). A bare FSDP2
    script of three steps, a state-dict gather and a barrier aborted so in 2 of 49 runs on 2 processes here, and the
    trainer under the full test suite now and then. The exit handlers still run while those threads may take the GIL.
    """
    try:
        run_as_main(argv)
        code = None
    except SystemExit as exit:
        code = exit.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what Python does with `sys.exit("message")`
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
