"""TeleChat2 tokenizer, chat template (with tools) and tool-call parser."""
from .template import (DEFAULT_SYSTEM_PROMPT, ParsedReply, TemplateError, ToolCall, ToolCallError,
                       parse_tool_calls, render, render_segments)
from .tokenizer import IGNORE_INDEX, SPECIAL_TOKENS, TeleChat2Tokenizer, TokenizerError

__all__ = [
    "TeleChat2Tokenizer", "SPECIAL_TOKENS", "IGNORE_INDEX", "DEFAULT_SYSTEM_PROMPT", "render", "render_segments",
    "parse_tool_calls", "ToolCall", "ParsedReply", "TemplateError", "ToolCallError", "TokenizerError",
]
