"""A Ray Tune scheduler: ASHA run separately within each group of comparable trials.

ASHA stops a trial whose metric at a rung is worse than most others'. Trials of different
shapes (a sweep's k or dictionary size) differ in their metric by design, so they are compared
only with trials of their own shape (``shape(trial.config)``); trials start in submission order.
"""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class ShapeASHA(FIFOScheduler):
    """One :class:`ASHAScheduler` (built from ``asha_kwargs``) per ``shape(trial.config)``."""

    def __init__(self, shape: Callable[[dict], tuple], **asha_kwargs):
        super().__init__()
        self._metric, self._mode = asha_kwargs["metric"], asha_kwargs["mode"]
        self.shape, self.asha_kwargs = shape, asha_kwargs
        self.by_shape: dict[tuple, ASHAScheduler] = {}
        self.of_trial: dict[str, ASHAScheduler] = {}

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return metric in (None, self._metric) and mode in (None, self._mode)

    def on_trial_add(self, tune_controller, trial) -> None:
        key = self.shape(trial.config or {})
        asha = self.by_shape.setdefault(key, ASHAScheduler(**self.asha_kwargs))
        self.of_trial[trial.trial_id] = asha
        asha.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.of_trial[trial.trial_id].on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.of_trial[trial.trial_id].on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.of_trial[trial.trial_id].on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.of_trial[trial.trial_id].on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA within each of {len(self.by_shape)} trial shapes"
