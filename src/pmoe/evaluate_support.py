"""The base class of the `evaluate` modules shipped in `pmoe/evaluate_modules` (imported only by them: `evaluate` is
an optional dependency)."""

import evaluate


class PMoEMetric(evaluate.Metric):
    """An `evaluate.Metric` whose `ValueError`s (bad inputs, found by `pmoe.metrics`) reach the caller cleanly.

    `evaluate` releases its cache file and lock only when `_compute` returns: an exception raised inside would leave
    them held (and the next `compute` would wait for the lock). So `_compute` keeps the error and `compute` raises it
    after the cleanup. Subclasses implement `_score(**inputs_and_options)`.
    """

    def compute(self, **kwargs):
        """Compute the metric (see the inputs description); bad inputs raise `ValueError`."""
        self._error = None
        result = super().compute(**kwargs)
        error, self._error = self._error, None
        if error is not None:
            raise error
        return result

    def _compute(self, **kwargs):
        try:
            return self._score(**kwargs)
        except ValueError as error:
            self._error = error
            return None

    def _score(self, **kwargs):
        raise NotImplementedError
