"""Errors that end a stage with one clear message instead of a traceback."""


class DataError(RuntimeError):
    """The data cannot support the stage (empty dataset, single class, k too large, ...)."""
