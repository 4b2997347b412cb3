"""TeleChat2 for MindSpore: the model, explicit parallelism, conversion, training and inference."""
from .config import TeleChat2Config

__version__ = "0.1.0"


def __getattr__(name):
    # the model imports MindSpore (~1 s); load it on first use so `telechat2 info` stays instant
    if name == "TeleChat2ForCausalLM":
        from .model import TeleChat2ForCausalLM
        return TeleChat2ForCausalLM
    raise AttributeError(name)


__all__ = ["TeleChat2Config", "TeleChat2ForCausalLM", "__version__"]
