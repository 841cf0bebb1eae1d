"""Exceptions and warnings that fdiv_eval raises."""


class InvalidInputError(ValueError):
    """A user input (suite field, CLI option, file) is invalid.

    The message names the value and how to fix it. The CLI prints it on one
    line and exits with status 2.
    """


class EstimationError(InvalidInputError):
    """A quantity cannot be estimated from the given samples (for example Z = 0)."""


class UnreliableEstimateWarning(UserWarning):
    """An importance-sampling estimate has a Pareto k̂ above 0.7 or a tiny effective sample size."""
