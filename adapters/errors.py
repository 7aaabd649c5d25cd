"""Typed errors raised at stage boundaries; the command-line entry points turn them into one-line messages."""


class EdgetuneError(Exception):
    """Base class: a problem the user can fix (the message says what to do)."""


class ConfigError(EdgetuneError):
    """A bad config file, key or value."""


class DataError(EdgetuneError):
    """A missing, empty or malformed data file."""


class TrainError(EdgetuneError):
    """Training could not run as configured."""


class AdapterError(EdgetuneError):
    """A missing, corrupt or incompatible adapter folder."""


class ExportError(EdgetuneError):
    """The export could not produce the graph that was asked for."""


class ParityError(ExportError):
    """The exported graph does not reproduce the eager PyTorch model."""
