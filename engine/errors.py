"""Domain errors. Each carries a message written for the user: what was wrong and what to do.

The UI shows ``str(err)`` as is; the CLI prints it and exits with status 2. Tracebacks go to the log only.
"""


class QuantScopeError(Exception):
    """Base class: the message is user-facing."""


class InputError(QuantScopeError, ValueError):
    """A number or option the user gave is out of range or unknown."""


class FastPathError(InputError):
    """A known format asked for with the fast decode path, which does not serve it (the message says which do)."""


class ConfigError(QuantScopeError):
    """A config.json is missing fields, malformed, or of an unsupported architecture."""


class ModelNotFoundError(QuantScopeError):
    """The model reference names no preset, local file or Hub repository."""


class GatedModelError(QuantScopeError):
    """The Hub repository exists but needs accepted terms and a token."""


class OfflineError(QuantScopeError):
    """The Hub cannot be reached (offline mode or no network)."""


class BackendUnavailableError(QuantScopeError):
    """The loader a format needs is not installed or cannot run on this device (the message says why)."""


class ModelLoadError(QuantScopeError):
    """Loading or quantizing the model failed (bad files, unsupported architecture, ...)."""


class GenerationError(QuantScopeError):
    """A generation run failed while producing tokens."""


class DoesNotFitError(QuantScopeError):
    """A model would not fit in the memory left for models (the message gives the estimate and what is free)."""


class OutOfMemoryDuringGenerationError(GenerationError):
    """The device ran out of memory while a loaded model was generating; the model has been unloaded."""
