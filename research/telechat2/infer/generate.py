"""Generation with a preallocated KV cache: static shapes, so prefill and decode each compile once per shape.

Shapes: prompts are left-padded to P = `length_bucket(longest prompt)` and the cache holds
L = `length_bucket(P + max_new_tokens)` slots per layer; buckets are 32 x 2^k and 48 x 2^k (at most 1.5x the
need), so the number of distinct shapes grows with the log of the length. Prefill runs the padded prompt [B, P]
and writes slots [0, P) (and zeroes the rest, on the device); decode step i runs one token [B, 1] and writes
slot P + i in place (ScatterNdUpdate of B x kv heads vectors; `model/attention.py::write_cache`). A query
attends to the slots at or before its own that hold real tokens (padding and unwritten slots are masked; the
mask and tables come from the model's one builder, `model/attention_inputs.py`); positions count real tokens
only (cumsum of the mask), so a left-padded row computes exactly what it computes alone.

Compiled decoders (`CachedDecoder` + its jitted prefill/decode) are kept per (batch, P, L) in an LRU of
`config.decoder_cache_size` entries; the least recently used one is dropped (its KV cache and graphs with it).

Positions past `training_seqlen` (dynamic NTK): the tables of each forward are built for the total length
so far (longest prompt + i + 1: the length the HF code sees for a batch padded to its longest prompt, whatever
the bucket) and applied to the new token only; cached keys keep the rotation they were written with. Below
training_seqlen the tables do not depend on the length, so cached decoding equals a full recompute exactly;
beyond it the two differ by design.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn
from mindspore.common.initializer import Zero, initializer

from ..dtypes import ms_dtype
from ..errors import TeleChat2Error
from ..options import POSITIVE_INT, require
from ..parallel.heads import kv_heads_per_rank
from ..model.attention_inputs import AttentionInputs, build_attention_inputs
from .distributed import share_prompts
from .sampling import GenerationConfig, choose_next


def kv_cache_buffers(config, tp: int, batch: int, cache_len: int) -> list[tuple[str, tuple, object]]:
    """(name, shape, dtype) of the KV cache one rank allocates: per layer K and V [B, kv heads/tp, L, hd] in the
    compute dtype (replicated kv heads when tp exceeds them). The memory inventory reads the same list."""
    shape = (batch, kv_heads_per_rank(config.kv_heads, tp), cache_len, config.head_dim)
    dtype = ms_dtype(config.compute_dtype)
    return [(f"kv_cache.{kv}.{i}", shape, dtype) for i in range(config.num_layers) for kv in "kv"]


def length_bucket(n: int, base: int = 32) -> int:
    """The smallest of base x 2^k and 1.5 base x 2^k (k >= 0) that holds n: base, 1.5 base, 2 base, 3 base, 4 base..."""
    size = base
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def cache_length(prompt_len: int, max_new_tokens: int, bucket: int = 32) -> int:
    """The cache length `generate` allocates for a prompt of `prompt_len` tokens: the bucket of the prompt's
    bucket plus the new tokens."""
    return length_bucket(length_bucket(prompt_len, bucket) + max_new_tokens, bucket)


class CachedDecoder(nn.Cell):
    """The model plus KV-cache Parameters for one (batch, cache length); returns last-position logits."""

    def __init__(self, model, batch: int, cache_len: int):
        super().__init__(auto_prefix=False)
        self.model = model
        caches = {name: Parameter(initializer(Zero(), shape, dtype), name=name, requires_grad=False)
                  for name, shape, dtype in kv_cache_buffers(model.config, model.mesh.tp, batch, cache_len)}
        n = model.config.num_layers
        self.k_caches = ParameterTuple([caches[f"kv_cache.k.{i}"] for i in range(n)])
        self.v_caches = ParameterTuple([caches[f"kv_cache.v.{i}"] for i in range(n)])

    def construct(self, input_ids, cos, sin, allowed, write_slot=None):
        hidden = self.model.forward(input_ids, cos, sin, allowed, self.k_caches, self.v_caches, write_slot)
        return self.model.head_logits(hidden[:, -1:])[:, 0]                            # [B, V]


class Generator:
    """Compiled prefill/decode per (batch, prompt bucket, cache bucket), the `max_decoders` most recently used
    kept (default: the model's `decoder_cache_size`)."""

    def __init__(self, model, bucket: int = 32, use_jit: bool = True, max_decoders: int | None = None):
        self.model, self.bucket, self.use_jit = model, bucket, use_jit
        size = model.config.decoder_cache_size if max_decoders is None else max_decoders
        self.max_decoders = require(POSITIVE_INT, size, "decoder_cache_size")
        self._decoders: OrderedDict[tuple[int, int, int], tuple] = OrderedDict()

    def cached_shapes(self) -> list[tuple[int, int, int]]:
        """The (batch, prompt bucket, cache bucket) of the decoders held, least recently used first."""
        return list(self._decoders)

    def _decoder(self, batch, prompt_len, cache_len):
        key = (batch, prompt_len, cache_len)
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key]
        while len(self._decoders) >= self.max_decoders:
            self._decoders.popitem(last=False)               # its cache Parameters and graphs go with it
        dec = CachedDecoder(self.model, batch, cache_len)
        fn = ms.jit(dec.construct) if self.use_jit else dec.construct
        # scatter indices of one decode token: (row, kv head, slot) for every row and kv head; slot set per step
        nkv = dec.k_caches[0].shape[1]
        index = np.zeros((batch, nkv, 3), np.int32)
        index[..., 0], index[..., 1] = np.arange(batch)[:, None], np.arange(nkv)[None, :]
        self._decoders[key] = (dec, fn, index)
        return self._decoders[key]

    def _inputs(self, num_tokens: int, total_len: int, positions: np.ndarray, query_slots: np.ndarray,
                real: np.ndarray) -> AttentionInputs:
        """The model's attention-input builder, for queries at cache `query_slots` [T] over the `real` [B, L]
        slots; rotary tables of a forward of `total_len` at `positions` [B, T]."""
        c = self.model.config
        return build_attention_inputs(self.model.rope, num_tokens, position_ids=positions, key_valid=real,
                                      total_len=total_len, query_slots=query_slots, num_keys=real.shape[1],
                                      dtype=ms_dtype(c.rotary_dtype))

    def generate(self, prompts: list[list[int]], cfg: GenerationConfig, streamer=None, timings: dict | None = None):
        """Full sequences (prompt + new tokens, up to and including a stop token) as lists of ints.

        streamer(step, tokens) is called with the [B] new token ids of every step (finished rows repeat pad).
        timings (a dict) receives prefill_s, first_token_s, total_s, row_s (per row: until its stop token) and
        compiled (True when this call's shapes were compiled first, so its times include the compilation).
        Under tensor parallel (msrun) rank 0's prompts are broadcast first: every rank generates them, and the
        others may pass None.
        """
        cfg.validate()
        if self.model.mesh.layout.world > 1:
            prompts = share_prompts(self.model.mesh, prompts)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TeleChat2Error("generate: every prompt needs at least one token")
        vocab = self.model.config.vocab_size
        for r, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise TeleChat2Error(f"generate: prompt {r} holds token id {bad[0]} outside [0, {vocab})")
        B = len(prompts)
        longest = max(len(p) for p in prompts)
        P = length_bucket(longest, self.bucket)
        L = length_bucket(P + cfg.max_new_tokens, self.bucket)
        fresh = (B, P, L) not in self._decoders             # this call compiles its graphs (timings include it)
        dec, run, write_index = self._decoder(B, P, L)

        ids = np.full((B, P), cfg.pad_token_id, np.int32)
        real = np.zeros((B, L), bool)                       # slots holding real tokens
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = p
            real[r, P - len(p):P] = True
        positions = np.maximum(np.cumsum(real[:, :P], 1) - 1, 0)
        t0 = time.perf_counter()
        attn = self._inputs(P, longest, positions, np.arange(P), real)
        logits = run(Tensor(ids), *attn).asnumpy()
        if timings is not None:
            timings["prefill_s"] = time.perf_counter() - t0

        rng = np.random.default_rng(cfg.seed)
        stops = {cfg.eos_token_id, *cfg.stop_token_ids}
        seqs = [list(map(int, p)) for p in prompts]
        seen = [np.asarray(p, np.int64) for p in prompts]
        done = np.zeros(B, bool)
        last_pos = positions[:, -1]
        finish = np.full(B, np.nan)                         # seconds from the start until each row stopped
        for step in range(cfg.max_new_tokens):
            nxt = choose_next(logits, seen, cfg, rng)
            nxt = np.where(done, cfg.pad_token_id, nxt)
            for r in np.flatnonzero(~done):
                seqs[r].append(int(nxt[r]))
                seen[r] = np.append(seen[r], nxt[r])
            newly = ~done & np.isin(nxt, list(stops))
            done |= newly
            if timings is not None:
                finish[newly] = time.perf_counter() - t0
            if streamer is not None:
                streamer(step, nxt.tolist())
            if timings is not None and step == 0:
                timings["first_token_s"] = time.perf_counter() - t0
            if done.all() or step == cfg.max_new_tokens - 1:
                break
            slot = P + step
            real[:, slot] = True
            last_pos = last_pos + 1
            write_index[..., 2] = slot
            attn = self._inputs(1, longest + step + 1, last_pos[:, None], np.array([slot]), real)
            logits = run(Tensor(nxt[:, None].astype(np.int32)), *attn, Tensor(write_index.copy())).asnumpy()
        if timings is not None:
            timings["total_s"] = time.perf_counter() - t0
            timings["compiled"] = fresh and self.use_jit
            timings["row_s"] = np.where(np.isnan(finish), timings["total_s"], finish).tolist()
        return seqs


def generate(model, input_ids, *, streamer=None, timings=None, **kwargs) -> list[list[int]]:
    """`model.generate`: input_ids is a list of token-id lists (lengths may differ) or a 2-D array (None on
    the ranks other than 0 under tensor parallel: they generate rank 0's prompts)."""
    if input_ids is None:
        prompts = None
    elif isinstance(input_ids, (np.ndarray, Tensor)):
        arr = input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids
        if arr.ndim != 2:
            raise TeleChat2Error(f"generate: input_ids must be 2-D [batch, length], got shape {arr.shape}")
        prompts = [list(map(int, row)) for row in arr]
    else:
        prompts = [list(map(int, p)) for p in input_ids]
    cfg = GenerationConfig(**kwargs)
    if not hasattr(model, "_generator"):
        model._generator = Generator(model)
    return model._generator.generate(prompts, cfg, streamer=streamer, timings=timings)
