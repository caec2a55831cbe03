"""Running one candidate in a child process, so a candidate that kills its process cannot kill the search.

A segmentation fault or an illegal memory access that poisons the CUDA context ends only the child: the parent
records the trial as failed and goes on. A child that runs past the per-trial timeout is killed.

On a GPU the parent and the child share the device: neither may grab most of its memory up front as JAX does by
default (the child's allocation would then fail), so the child turns preallocation off unless the user chose, and
`autotune search --isolate` does the same for the parent.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import asdict

from autotune.measure.kernel_call import compile_candidate
from autotune.measure.evaluation import TrialOutcome, evaluate, failure, timing_inputs
from autotune.kernel_protocol import load_kernel
from autotune.options import SearchOptions
from kernels import Problem


def _child(conn, kernel_name: str, config: dict, problem: dict, options: SearchOptions, seed: int,
           interpret: bool) -> None:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before the first JAX call starts the backend
    problem_ = Problem(**problem)
    kernel = load_kernel(kernel_name)
    try:
        compiled = compile_candidate(kernel, kernel.Config.from_dict(config), problem_, interpret=interpret)
    except Exception as exc:  # noqa: BLE001
        conn.send(asdict(failure("compile", exc)))
        return
    outcome = evaluate(compiled.call, compiled.compile_s, problem_, options, seed,
                       timing_inputs(problem_, options, seed))
    conn.send(asdict(outcome))


def evaluate_isolated(kernel_name: str, config, problem: Problem, options: SearchOptions, seed: int, *,
                      interpret: bool) -> TrialOutcome:
    """Compile, check and time a candidate in a fresh process; a dead or hung child is a failed trial."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, daemon=True,
                            args=(send, kernel_name, config.to_dict(), problem.to_dict(), options, seed, interpret))
    child.start()
    send.close()
    timeout = options.trial_timeout_s
    ended = receive.poll(timeout)  # a result, or end of file when the child died
    result = None
    if ended:
        try:
            result = receive.recv()
        except EOFError:
            pass
    # A child that closed its end is exiting: give it time to be reaped (a dying process can take a while to free a
    # large address space) so that a crash is not mistaken for a timeout.
    child.join(5 if result is not None else 30 if ended else 0.5)
    if result is not None:
        if child.is_alive():  # stuck on its way out: the result is in, so it is of no further use
            child.kill()
            child.join()
        return TrialOutcome(**result)
    if child.is_alive():
        child.kill()
        child.join()
        return TrialOutcome("timeout", error_class="Timeout",
                            error_message=f"the candidate ran longer than {timeout} s and was killed")
    code = child.exitcode
    name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
    return TrialOutcome("runtime_error", error_class="ProcessDied",
                        error_message=f"the candidate's process died ({name})")
