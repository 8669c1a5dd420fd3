"""Exception types. Every user-facing failure in dgemma is one of these, with a message that says what was
wrong and what was expected; the CLI prints the message, never a traceback."""


class DGemmaError(Exception):
    """Base class for errors dgemma reports to the user."""


class ConfigError(DGemmaError):
    """A config.json / generation_config.json that dgemma cannot use."""


class CheckpointError(DGemmaError):
    """A checkpoint directory or weight file that is missing, corrupt or inconsistent with its config."""


class UnsupportedInputError(DGemmaError):
    """Input dgemma understands but does not support (for example image tokens)."""
