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
