"""User-facing errors: each carries a sentence that names the file, tensor or field and what to do."""


class DSV4Error(Exception):
    """Base class for errors the CLI prints as one sentence (no traceback)."""


class ConfigError(DSV4Error, ValueError):
    pass


class CheckpointError(DSV4Error):
    pass


class BackendUnavailable(DSV4Error):
    pass


class InputError(DSV4Error, ValueError):
    pass
