"""The scikit-learn estimator base: scikit-learn's own classes when it is installed.

With scikit-learn, :class:`GaussianMixture` is a ``BaseEstimator`` and ``DensityMixin`` (as
``sklearn.mixture.GaussianMixture``), so it has scikit-learn's ``get_params``/``set_params``,
``__repr__``, ``__sklearn_tags__`` and cloning, and works in ``Pipeline``, ``GridSearchCV`` and
``cross_val_score``; its warnings and errors are scikit-learn's ``ConvergenceWarning`` and
``NotFittedError``. Without scikit-learn (not a dependency) the same names are small stand-ins
with the behaviour the library itself relies on.
"""
from __future__ import annotations

import inspect

try:
    from sklearn.base import BaseEstimator, DensityMixin
    from sklearn.exceptions import ConvergenceWarning, NotFittedError
except ImportError:  # scikit-learn is optional
    class ConvergenceWarning(UserWarning):
        """EM stopped at max_iter before the lower bound changed by less than tol."""

    class NotFittedError(ValueError, AttributeError):
        """A method that needs a fitted model was called before fit (as scikit-learn's)."""

    class DensityMixin:
        """scikit-learn's marker of density estimators (stand-in)."""

    class BaseEstimator:
        """``get_params``/``set_params``/``__repr__`` from the ``__init__`` signature (stand-in
        for scikit-learn's)."""

        @classmethod
        def _get_param_names(cls):
            return [name for name in inspect.signature(cls.__init__).parameters if name != "self"]

        def get_params(self, deep=True):
            return {name: getattr(self, name) for name in self._get_param_names()}

        def set_params(self, **params):
            valid = self._get_param_names()
            for name, value in params.items():
                if name not in valid:
                    raise ValueError(f"invalid parameter {name!r} for {type(self).__name__}; valid: {sorted(valid)}")
                setattr(self, name, value)
            return self

        def __repr__(self):
            defaults = inspect.signature(type(self).__init__).parameters
            changed = [f"{k}={v!r}" for k, v in self.get_params().items()
                       if not hasattr(v, "shape") and v != defaults[k].default]
            return f"{type(self).__name__}({', '.join(changed)})"

__all__ = ["BaseEstimator", "ConvergenceWarning", "DensityMixin", "NotFittedError"]
