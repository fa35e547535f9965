"""gptlab: build GPT models end to end.

Importing the package is cheap: heavy modules (torch, tokenizers) load only when
their names are first used, so `gptlab --help` and `import gptlab` stay instant.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it, resolved on first attribute access (PEP 562)
_LAZY = {
    "GPTConfig": "gptlab.config",
    "TrainConfig": "gptlab.config",
    "SampleConfig": "gptlab.config",
    "GptlabError": "gptlab.errors",
    "Tokenizer": "gptlab.tokenizer",
    "GPT": "gptlab.model",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptlab' has no attribute {name!r}")
