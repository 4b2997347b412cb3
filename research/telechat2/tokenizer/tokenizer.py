"""`TeleChat2Tokenizer`: SentencePiece BPE plus TeleChat2's special tokens and chat template.

Ids 0-12 are fixed (`SPECIAL_TOKENS`). Inside a released `tokenizer.model` ids 9-12 are the control pieces
`<_control1..4>`; the names `<tool_call>`, `</tool_call>`, `<tool_response>`, `</tool_response>` are mapped onto
them here, as the HF tokenizer_config does.

Encoding: special-token names are split out of the text first and become single ids; each text chunk between
them is encoded on its own by SentencePiece, so each chunk gets its own dummy prefix `▁`. No BOS/EOS is added.
Decoding inverts this chunk by chunk, so `decode(encode(s)) == s` whenever SentencePiece's normalizer leaves
`s` unchanged (the tiny tokenizer uses the identity normalizer and keeps repeated spaces).
"""
from __future__ import annotations

import os
import re

from ..errors import TeleChat2Error
from . import template

SPECIAL_TOKENS = (
    "<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)
# pieces a released tokenizer.model holds at ids 9-12
CONTROL_PIECES = {9: "<_control1>", 10: "<_control2>", 11: "<_control3>", 12: "<_control4>"}
IGNORE_INDEX = -100

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
# SentencePiece's list call runs a thread pool (~0.1 ms to start on this machine, ~15 us per short chunk);
# below this many chunks one call per chunk is faster
_BATCH_MIN_CHUNKS = 32


class TokenizerError(TeleChat2Error):
    """The tokenizer file is missing or not a TeleChat2 tokenizer, or ids are outside its vocabulary."""


class TeleChat2Tokenizer:
    """Load a TeleChat2 `tokenizer.model` (the 131072-piece release or the tiny CPU one).

    `num_threads` is SentencePiece's thread count for large batches (-1: all cores; preprocessing workers
    use 1 so that processes do not compete for cores).
    """

    unk_id, bos_id, eos_id, pad_id = 0, 1, 2, 3
    user_id, bot_id, system_id, observation_id, sep_id = 4, 5, 6, 7, 8
    tool_call_id, tool_call_end_id, tool_response_id, tool_response_end_id = 9, 10, 11, 12

    def __init__(self, vocab_file: str, *, num_threads: int = -1):
        import sentencepiece as spm

        self.num_threads = num_threads
        self.vocab_file = os.fspath(vocab_file)
        if not os.path.isfile(self.vocab_file):
            raise TokenizerError(f"{self.vocab_file}: no such tokenizer file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.vocab_file)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.vocab_file}: not a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        if n < len(SPECIAL_TOKENS):
            raise TokenizerError(f"{self.vocab_file}: only {n} pieces; a TeleChat2 tokenizer has ids 0-12 reserved")
        for i, name in enumerate(SPECIAL_TOKENS):
            piece = self.sp.id_to_piece(i)
            if piece != name and piece != CONTROL_PIECES.get(i):
                expected = name if i not in CONTROL_PIECES else f"{name} or {CONTROL_PIECES[i]}"
                raise TokenizerError(f"{self.vocab_file}: id {i} is {piece!r}, expected {expected}; "
                                     "not a TeleChat2 tokenizer")
        self.special_ids = {name: i for i, name in enumerate(SPECIAL_TOKENS)}

    # ---- sizes and names ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def id_to_token(self, i: int) -> str:
        if 0 <= i < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[i]
        self._check_ids([i])
        return self.sp.id_to_piece(i)

    def token_to_id(self, token: str) -> int:
        """Id of a special-token name or a SentencePiece piece (`<_unk>` id 0 if unknown)."""
        if token in self.special_ids:
            return self.special_ids[token]
        return self.sp.piece_to_id(token)

    # ---- encode / decode ----------------------------------------------------------------------------
    def _split(self, text: str) -> list[str]:
        # alternating [text, special, text, special, ..., text]; texts may be empty
        return _SPECIAL_RE.split(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: special-token names become their ids, every chunk between them is encoded
        separately (with its own dummy prefix). No BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text; the text chunks of all texts go to SentencePiece in one batch call."""
        plans, chunks = [], []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode expects str, got {type(text).__name__}")
            plan = []
            for k, part in enumerate(self._split(text)):
                if k % 2:
                    plan.append(self.special_ids[part])
                elif part:
                    plan.append(None)
                    chunks.append(part)
            plans.append(plan)
        if len(chunks) >= _BATCH_MIN_CHUNKS:
            encoded = iter(self.sp.encode(chunks, num_threads=self.num_threads))
        else:
            encoded = iter([self.sp.encode(c) for c in chunks])
        out = []
        for plan in plans:
            ids: list[int] = []
            for item in plan:
                if item is None:
                    ids.extend(next(encoded))
                else:
                    ids.append(item)
            out.append(ids)
        return out

    def _check_ids(self, ids) -> None:
        n = self.vocab_size
        for i in ids:
            if not 0 <= i < n:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {n}) of {self.vocab_file}")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; special ids become their names (or nothing with skip_special_tokens). Text chunks
        between special ids are decoded separately, each losing its dummy prefix, mirroring `encode`."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        out, chunk = [], []
        for i in ids:
            if i < len(SPECIAL_TOKENS):
                if chunk:
                    out.append(self.sp.decode(chunk))
                    chunk = []
                if not skip_special_tokens:
                    out.append(SPECIAL_TOKENS[i])
            else:
                chunk.append(i)
        if chunk:
            out.append(self.sp.decode(chunk))
        return "".join(out)

    # ---- chat -------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True,
                            tokenize: bool = True):
        """Render a conversation with the TeleChat2 template (see `template.py`).

        Returns token ids, or the rendered string when `tokenize=False`.
        """
        text = template.render(messages, tools, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode_chat_with_labels(self, messages, tools=None) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a whole conversation for fine-tuning, without a generation prompt.

        labels[i] == input_ids[i] on assistant content, its tool calls and its `<_end>`; IGNORE_INDEX (-100)
        elsewhere. The labels are not shifted: the loss shifts them.
        """
        segments = template.render_segments(messages, tools, add_generation_prompt=False)
        pieces = self.encode_batch([text for text, _ in segments])
        ids: list[int] = []
        labels: list[int] = []
        for (_, learned), seg_ids in zip(segments, pieces):
            ids.extend(seg_ids)
            labels.extend(seg_ids if learned else [IGNORE_INDEX] * len(seg_ids))
        return ids, labels

    def parse_tool_calls(self, text: str) -> template.ParsedReply:
        """Structured tool calls of a generated reply (see `template.parse_tool_calls`)."""
        return template.parse_tool_calls(text)
