"""The search space of one kernel on one problem, and the Optuna sampler that walks it.

Optuna sees every tunable field as an integer index into that field's sorted choices, so every sampler (TPE,
CMA-ES, random, grid) works on any kernel's space; `Space.config` turns indices back into the kernel's Config.
"""
from __future__ import annotations

import itertools
import json

import optuna

from autotune.kernel_protocol import KernelModule
from kernels import Problem


def config_text(config: dict) -> str:
    """A config as the study compares configs: canonical JSON."""
    return json.dumps(config, sort_keys=True)


class Space:
    """The kernel's tunable fields for one problem, as Optuna integer indices into each field's sorted choices.

    `device_kind` is the real device's kind (None in interpret mode): the default config and the validity check
    both depend on it.
    """

    def __init__(self, kernel: KernelModule, problem: Problem, device_kind: str | None, ahead=None):
        self.kernel, self.problem, self.device_kind = kernel, problem, device_kind
        self.default = kernel.Config.default(problem, device_kind=device_kind)
        self.choices = {name: tuple(sorted(set(values))) for name, values in kernel.search_space(problem).items()}
        self.ahead = ahead  # autotune.compile.results.AheadOfTime: a compile-only sweep's verdicts, or None

    def skip_reason(self, config) -> str | None:
        """Why a valid config is not evaluated: the compiler rejected it ahead of time ('rejected') or it spilled
        ('spills'); None to evaluate it. The default config is always evaluated: it is the baseline."""
        if self.ahead is None or config == self.default:
            return None
        return self.ahead.skip_reason(config.to_dict())

    def searchable_configs(self) -> list:
        """The valid configs the search evaluates (the grid): those a compile-only sweep did not rule out."""
        return [c for c in self.valid_configs() if self.skip_reason(c) is None]

    def config(self, params: dict[str, int]):
        values = {name: self.choices[name][index] for name, index in params.items()}
        return type(self.default).from_dict({**self.default.to_dict(), **values})

    def from_dict(self, data: dict):
        return type(self.default).from_dict(data)

    def params(self, config) -> dict[str, int] | None:
        """Indices of a config's values, or None if one is not among the choices."""
        data = config.to_dict()
        try:
            return {name: self.choices[name].index(data[name]) for name in self.choices}
        except ValueError:
            return None

    def suggest(self, trial: optuna.Trial):
        return self.config({name: trial.suggest_int(name, 0, len(vals) - 1) for name, vals in self.choices.items()})

    def invalid_reasons(self, config) -> list[str]:
        return list(self.kernel.invalid_reasons(config, self.problem, device_kind=self.device_kind))

    def valid_configs(self) -> list:
        """Every valid config of the space (the grid)."""
        names = list(self.choices)
        configs = []
        for combo in itertools.product(*(range(len(self.choices[n])) for n in names)):
            config = self.config(dict(zip(names, combo)))
            if not self.invalid_reasons(config):
                configs.append(config)
        return configs


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=8, multivariate=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random, and grid (whose configs are all enqueued)
