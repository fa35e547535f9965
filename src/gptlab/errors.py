"""Exceptions gptlab raises for bad input. The CLI prints their message on one line and exits 2."""


class GptlabError(Exception):
    """Base class: a problem with the user's input, files or configuration (not a bug)."""


class ConfigError(GptlabError, ValueError):
    """A configuration field has a value gptlab cannot use; the message names the field."""


class DataError(GptlabError):
    """A corpus, text file or token shard is missing, empty, unreadable or malformed."""


class TokenizerError(GptlabError):
    """A tokenizer file is missing or malformed, or a tokenizer cannot encode/decode the input."""


class CheckpointError(GptlabError):
    """A checkpoint is missing, incomplete or corrupted."""


class InputError(GptlabError, ValueError):
    """A runtime input (prompt, token ids, batch) does not fit the model, e.g. longer than its context."""
