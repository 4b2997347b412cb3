"""TeleChat2 network math (MindSpore cells)."""
from .transformer import DecoderLayer, TeleChat2ForCausalLM, TeleChat2Model

__all__ = ["DecoderLayer", "TeleChat2ForCausalLM", "TeleChat2Model"]
