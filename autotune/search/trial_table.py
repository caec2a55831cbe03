"""Our trials table's side of a key's shared study: what each evaluated trial is recorded as.

The study (Optuna's tables) decides which trials count; this module writes their outcomes into `autotune_trials`
and copies in the finished trials a worker told the study about but died before recording (`reconcile`), or that
died inside a trial (a `WorkerLost` failure). One row per trial number, whoever notices first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import optuna

from autotune.measure.evaluation import TrialOutcome
from db import Store, TuningKey

KIND_ATTR = "kind"  # user attr marking trials that do not count toward the budget: invalid, duplicate, over_budget,
#                    interrupted (the worker stopped before evaluating it)
OUTCOME_ATTR = "outcome"  # user attr: the TrialOutcome as a dict, plus "costs" (seconds of the search's own work)
COMPLETE = optuna.trial.TrialState.COMPLETE
FAILED_STATUSES_EXCLUDED = ("ok", "invalid")  # statuses that are not failures of a candidate


@dataclass(frozen=True)
class TrialTable:
    """One key's rows in our trials table, written under this worker's run."""

    store: Store
    key: TuningKey
    run_id: int | None = None

    def record(self, number: int, config: dict, outcome: TrialOutcome) -> None:
        self.store.add_trial(
            self.key, config=config, status=outcome.status, run_id=self.run_id, number=number,
            error_class=outcome.error_class, error_message=outcome.error_message, compile_s=outcome.compile_s,
            time_s=outcome.time_s, time_spread_s=outcome.spread_s, time_count=outcome.count,
            max_error=outcome.max_error,
        )

    def record_set_aside(self, number: int, config: dict, error_class: str, message: str) -> None:
        """A trial not evaluated because of its config (invalid, or skipped ahead of time): status `invalid`."""
        self.store.add_trial(self.key, config=config, status="invalid", run_id=self.run_id, number=number,
                             error_class=error_class, error_message=message)

    def recorded_numbers(self) -> set[int]:
        return {row.number for row in self.store.trials(self.key)}

    def record_finished(self, trial: optuna.trial.FrozenTrial, lost: str, recorded: set[int] | None = None) -> None:
        """Copy a finished trial of the study into our table unless it is there: its outcome if its worker got
        that far (and the study agrees), else a `WorkerLost` failure with the message `lost`."""
        config = trial.user_attrs.get("config")
        if config is None or KIND_ATTR in trial.user_attrs:
            return  # it died before its config was chosen, or it was never to be evaluated: nothing to record
        if recorded is None:
            recorded = self.recorded_numbers()
        if trial.number in recorded:
            return
        data = dict(trial.user_attrs.get(OUTCOME_ATTR) or {})
        data.pop("costs", None)
        if data and (data.get("status") == "ok") == (trial.state == COMPLETE):
            outcome = TrialOutcome(**data)
        else:
            outcome = TrialOutcome("runtime_error", error_class="WorkerLost", error_message=lost)
        self.record(trial.number, config, outcome)

    def reconcile(self, finished: list[optuna.trial.FrozenTrial]) -> None:
        """Copy into our table the finished trials it lacks (their worker died between the study and our table)."""
        recorded = self.recorded_numbers()
        for trial in finished:
            if trial.number not in recorded:
                self.record_finished(trial, "the worker running this trial stopped before recording it", recorded)

    def statuses(self) -> tuple[dict[str, int], int]:
        """The key's rows counted by status, and how many of them failed."""
        counts: dict[str, int] = {}
        for row in self.store.trials(self.key):
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts, sum(n for s, n in counts.items() if s not in FAILED_STATUSES_EXCLUDED)


def outcome_attr(outcome: TrialOutcome, costs: dict) -> dict:
    """The user attr a told trial carries: its whole outcome (for `record_finished`) and the search's costs."""
    return {**asdict(outcome), "costs": costs}
