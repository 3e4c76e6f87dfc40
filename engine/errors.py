"""Errors the engine raises for one request; the server maps each class to one gRPC status (server/convert.py)."""


class EngineError(Exception):
    """Base class: a failure that ends one request and leaves the engine serving."""


class InvalidRequest(EngineError, ValueError):
    """The request can never succeed as sent. `field` names the offending field (proto path)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class CapacityExceeded(EngineError):
    """Admission refused now (queue, tokens in flight, memory); retrying later may succeed."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The engine is starting, draining or dead."""


class RequestFailed(EngineError):
    """An internal failure while this request was running (an exception inside its engine step)."""


class DataLoss(EngineError):
    """Exactness was required but the full-precision data to provide it is missing or corrupt."""
