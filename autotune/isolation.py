"""Running one candidate in a child process, so a candidate that kills its process cannot kill the search.

A segmentation fault or an illegal memory access that poisons the CUDA context ends only the child: the parent
records the trial as failed and goes on. A child that runs past the per-trial timeout is killed.
"""
from __future__ import annotations

import multiprocessing
import signal
from dataclasses import asdict

from autotune.search import SearchOptions, TrialOutcome
from kernels import Problem


def _child(conn, kernel_name: str, config: dict, problem: dict, options: SearchOptions, seed: int,
           interpret: bool) -> None:
    from autotune.candidate import compile_candidate
    from autotune.kernels_registry import load_kernel
    from autotune.search import evaluate, failure, timing_inputs

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
    if receive.poll(timeout):
        try:
            result = receive.recv()
        except EOFError:
            result = None
    else:
        result = None
    child.join(5 if result is not None else 0.5)
    if result is not None:
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
