"""One small hierarchy of errors; every message names the offending field, what was expected and what was got."""

from __future__ import annotations


class CosmosEdgeError(Exception):
    """Base of every error cosmos-edge raises on purpose."""


class ConfigError(CosmosEdgeError, ValueError):
    """A configuration value is invalid or unknown."""


class CheckpointError(CosmosEdgeError):
    """A checkpoint file is missing, unsafe, or does not match the expected network."""


class InputError(CosmosEdgeError, ValueError):
    """An observation, instruction or array given to the runtime is malformed. `field` names the request field at
    fault where one is (a server's error reply carries it)."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class BundleError(CosmosEdgeError):
    """A deployable bundle is incomplete, corrupted or built for something else."""


class ProtocolError(CosmosEdgeError, ValueError):
    """A wire message is malformed."""


class EngineError(CosmosEdgeError, RuntimeError):
    """An inference backend is missing or failed."""


class NonFiniteOutput(EngineError):
    """The network answered NaN or infinity: its weights, the instruction's embedding or the engine failed, never the
    request."""
