"""Exceptions that carry a message meant for the user (CLI line, HTTP error body)."""


class InfinikvError(Exception):
    """Base class: the message is complete and safe to show to a user."""


class ModelNotFoundError(InfinikvError):
    """The model argument names no directory, GGUF file, or reachable hub id."""


class UnsupportedModelError(InfinikvError):
    """The model's architecture (or one of its options) is not implemented."""


class CacheFullError(InfinikvError):
    """The page pool has no free page for a sequence that needs one."""


class MemoryFullError(InfinikvError):
    """A sequence's evicted memory would outgrow its RAM budget."""


class KernelBuildError(InfinikvError):
    """The CPU kernels (`infinikv.kernels.cpu`) could not be compiled or loaded on this machine."""


class CapacityError(InfinikvError):
    """A prompt or document is longer than what its sequence can hold."""


class SessionNotFoundError(InfinikvError):
    """No session with this id belongs to the caller (or it was deleted)."""


class SessionBusyError(InfinikvError):
    """Another process holds the session's lease; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLostError(InfinikvError):
    """Another process took the session's lease: this process's write was refused."""


class DocumentError(InfinikvError):
    """An uploaded document is corrupt, empty, encrypted or in a format that is not read."""


class UnsupportedDocumentError(DocumentError):
    """An uploaded document's file type is not one that is read."""
