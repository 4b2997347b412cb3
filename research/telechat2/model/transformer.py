"""The TeleChat2 decoder: pre-norm layers, final norm, untied lm_head.

Parameter names are MindFormers' research/telechat2 names (model.tok_embeddings.embedding_weight,
model.layers.{i}.attention.wq.weight, ...), so its MindSpore checkpoints load unchanged.
"""
from __future__ import annotations

import warnings

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..config import TeleChat2Config
from ..dtypes import ms_dtype
from ..parallel import ColumnParallelLinear, ParallelMesh, VocabParallelEmbedding
from ..parallel.layers import linear
from ..parallel.cross_entropy import VocabParallelCrossEntropy
from ..parallel.mappings import GatherFromTensorParallel, tp_collective
from .attention import Attention
from .attention_inputs import build_attention_inputs, rope_spec
from .loss import causal_lm_loss, label_count, token_nll
from .mlp import MLP
from .moe import MoE
from .norm import RMSNorm


class DecoderLayer(nn.Cell):
    """h = x + Attn(RMSNorm_in(x)); out = h + MLP(RMSNorm_post(h)). With `num_experts` the MLP is the MoE
    sub-cell (model/moe.py) and the layer returns (out, the layer's router aux loss)."""

    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh):
        super().__init__()
        norm = dict(compute_type=ms_dtype(config.layernorm_compute_type), param_dtype=ms_dtype(config.param_init_type),
                    fused=config.use_fused_rms_norm)
        self.res_dtype = ms_dtype(config.res_dtype)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.attention = Attention(config, mesh)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **norm)
        self.moe = bool(config.num_experts)
        self.feed_forward = MoE(config, mesh) if self.moe else MLP(config, mesh)

    def select_recompute(self):
        """Megatron's selective recompute: the attention core and the SwiGLU activation are recomputed in
        the backward instead of kept (the full layer stays kept: `recompute()` recomputes all of it)."""
        self.attention.core.recompute()
        (self.feed_forward.ffn.act if self.moe else self.feed_forward.act).recompute()

    def construct(self, x, cos, sin, allowed, k_cache=None, v_cache=None, write_slot=None):
        # x: [B, S, H] in the residual dtype; the cache arguments are for generation (see Attention)
        attn = self.attention(self.attention_norm(x), cos, sin, allowed, k_cache, v_cache, write_slot)
        h = x + attn.astype(self.res_dtype)
        if self.moe:
            ff, aux = self.feed_forward(self.ffn_norm(h))
            return h + ff.astype(self.res_dtype), aux
        return h + self.feed_forward(self.ffn_norm(h)).astype(self.res_dtype)


class TeleChat2Model(nn.Cell):
    """Embedding -> decoder layers -> final norm. A pipeline stage holds only its block of layers
    (`layer_ids`; parameter names keep the global layer index), the embedding on the first stage and the
    final norm on the last. MoE: returns (hidden, sum of the layers' aux losses)."""

    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh, layer_ids=None, first=True, last=True,
                 layer_chunk=None):
        super().__init__()
        self.res_dtype = ms_dtype(config.res_dtype)
        self.moe = bool(config.num_experts)
        self.first, self.last = first, last
        # interleaved pipeline: the model chunk of each held layer, in layer order (chunk_forward)
        self.layer_chunk = tuple(layer_chunk) if layer_chunk is not None else (0,) * len(layer_ids or ())
        self.chunks = max(self.layer_chunk) + 1 if self.layer_chunk else 1
        if first:
            self.tok_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, mesh=mesh,
                                                         init_std=config.initializer_range,
                                                         param_dtype=ms_dtype(config.param_init_type))
        ids = range(config.num_layers) if layer_ids is None else layer_ids
        self.layers = nn.CellDict({str(i): DecoderLayer(config, mesh) for i in ids})
        if last:
            self.norm_out = RMSNorm(config.hidden_size, config.rms_norm_eps,
                                    compute_type=ms_dtype(config.layernorm_compute_type),
                                    param_dtype=ms_dtype(config.param_init_type), fused=config.use_fused_rms_norm)

    def construct(self, inputs, cos, sin, allowed, k_caches=None, v_caches=None, write_slot=None):
        # inputs: token ids [B, S] on the first stage, else hidden states [B, S, H] (SP: [B, S/tp, H])
        x = self.tok_embeddings(inputs).astype(self.res_dtype) if self.first else inputs
        aux = ops.zeros((), ms.float32)
        if k_caches is None:
            for layer in self.layers.values():
                if self.moe:
                    x, layer_aux = layer(x, cos, sin, allowed)
                    aux = aux + layer_aux
                else:
                    x = layer(x, cos, sin, allowed)
        else:
            i = 0
            for layer in self.layers.values():
                if self.moe:
                    x, _ = layer(x, cos, sin, allowed, k_caches[i], v_caches[i], write_slot)
                else:
                    x = layer(x, cos, sin, allowed, k_caches[i], v_caches[i], write_slot)
                i += 1
        x = self.norm_out(x) if self.last else x
        return (x, aux) if self.moe else x

    def chunk_forward(self, chunk, x, cos, sin, allowed):
        """Model chunk `chunk` (a Python int) of an interleaved pipeline rank: its layers, after the embedding
        on the first stage's chunk 0, before the final norm on the last stage's last chunk. MoE: returns
        (hidden, sum of the chunk's layers' aux losses), which the pipeline adds to the loss."""
        if self.first and chunk == 0:
            x = self.tok_embeddings(x).astype(self.res_dtype)
        aux = ops.zeros((), ms.float32)
        i = 0
        for layer in self.layers.values():
            if self.layer_chunk[i] == chunk:
                if self.moe:
                    x, layer_aux = layer(x, cos, sin, allowed)
                    aux = aux + layer_aux
                else:
                    x = layer(x, cos, sin, allowed)
            i += 1
        if self.last and chunk == self.chunks - 1:
            x = self.norm_out(x)
        return (x, aux) if self.moe else x


class HeadLossChunk(nn.Cell):
    """lm_head and the (vocab-parallel) cross entropy of one chunk of positions, summed. The weight comes in as
    an argument, so the lm_head parameter keeps its one owner and name; marked for recompute by the model."""

    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh):
        super().__init__()
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.ignore = config.ignore_token_id
        self.vocab_parallel_loss = VocabParallelCrossEntropy(mesh, config.vocab_size, config.ignore_token_id) \
            if mesh.tp > 1 else None

    def construct(self, weight, x, targets):
        logits = linear(x.astype(self.compute_dtype), weight.astype(self.compute_dtype))
        logits = logits.astype(ms.float32)
        if self.vocab_parallel_loss is None:
            return token_nll(logits, targets, self.ignore).sum()
        return self.vocab_parallel_loss(logits, targets).sum()


class TeleChat2ForCausalLM(nn.Cell):
    """`model(input_ids)` -> fp32 logits [B, S, V]; `model(input_ids, labels)` -> mean loss (scalar)."""

    def __init__(self, config: TeleChat2Config, mesh: ParallelMesh | None = None):
        super().__init__()
        mesh = mesh or ParallelMesh.single()
        config = _without_unavailable_kernels(config)
        self.config = config
        self.mesh = mesh
        self.moe = bool(config.num_experts)
        self.rotary_dtype = ms_dtype(config.rotary_dtype)
        self.rope = rope_spec(config)
        # context parallel: this rank holds the zigzag part of every sequence (global positions below)
        self.cp = mesh.layout.cp
        if self.cp > 1:
            from ..parallel.mappings import ReduceFromTensorParallel, group_collective
            from ..parallel.ring_attention import zigzag_indices
            self.cp_positions = zigzag_indices(config.seq_length, self.cp, mesh.coord("cp")).astype(np.int32)
            self.cp_sum = group_collective(ReduceFromTensorParallel, mesh, "cp")   # all-reduce fwd, identity bwd
        pp, stage = mesh.layout.pp, mesh.coord("pp")
        self.first_stage, self.last_stage = stage == 0, stage == pp - 1
        # hidden-state inputs of later stages are split over the sequence under SP; attention gathers it
        self.input_seq_split = mesh.tp if not self.first_stage and mesh.sequence_parallel else 1
        layer_ids = layer_chunk = None
        if pp > 1:                              # this rank's layers, one block per model chunk
            blocks = mesh.rank_layers(config.num_layers)
            layer_ids = [i for block in blocks for i in block]
            layer_chunk = [c for c, block in enumerate(blocks) for _ in block]
            # SP: hidden-state inputs (every chunk but the first stage's chunk 0) are split over the sequence
            self.chunk_seq_split = tuple(1 if (self.first_stage and c == 0) or not mesh.sequence_parallel
                                         else mesh.tp for c in range(len(blocks)))
        self.model = TeleChat2Model(config, mesh, layer_ids, self.first_stage, self.last_stage, layer_chunk)
        if not self.last_stage:
            return
        # logits stay split over the vocabulary: the loss reduces over tp, logits() gathers them
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False, mesh=mesh,
                                            init_std=config.initializer_range,
                                            param_dtype=ms_dtype(config.param_init_type),
                                            compute_dtype=ms_dtype(config.compute_dtype))
        self.gather_vocab = tp_collective(GatherFromTensorParallel, mesh) if mesh.tp > 1 else None
        self.vocab_parallel_loss = VocabParallelCrossEntropy(mesh, config.vocab_size, config.ignore_token_id) \
            if mesh.tp > 1 else None
        self.chunk_loss = None
        if config.loss_chunk_tokens:            # the head + loss a chunk of the sequence at a time, recomputed
            self.chunk_loss = HeadLossChunk(config, mesh)
            self.chunk_loss.recompute()

    @classmethod
    def from_hf(cls, hf_dir: str, mesh: ParallelMesh | None = None, **config_overrides) -> "TeleChat2ForCausalLM":
        """Build from an HF release folder (config.json + safetensors shards + index) by pure renaming."""
        from mindspore.nn.utils import no_init_parameters
        from ..checkpoint.load import load_weights
        with no_init_parameters():      # every parameter comes from the release: no random init to allocate
            model = cls(TeleChat2Config.from_hf_config(hf_dir, **config_overrides), mesh)
        load_weights(model, hf_dir)
        return model

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, **kwargs) -> list[list[int]]:
        """Prompt + new tokens per row (list of ints), with a preallocated KV cache.

        input_ids: list of token-id lists (lengths may differ; left-padded internally) or a 2-D array.
        kwargs: temperature, top_k, top_p, repetition_penalty, seed, eos_token_id, stop_token_ids,
        pad_token_id (see telechat2.infer.sampling.GenerationConfig), streamer, timings.
        """
        from ..infer.generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)

    def __call__(self, input_ids, *args, **kwargs):
        # accept numpy arrays (PyNative); under ms.jit `construct` is compiled directly
        args = tuple(_to_tensor(a) for a in args)
        kwargs = {k: _to_tensor(v) for k, v in kwargs.items()}
        return super().__call__(_to_tensor(input_ids), *args, **kwargs)

    def attention_inputs(self, num_tokens: int, position_ids=None, segment_ids=None, attention_mask=None):
        """The rotary tables and mask of a forward whose attention sees `num_tokens` tokens of a full sequence
        (this rank's zigzag part under context parallel). position_ids, segment_ids, attention_mask: [B, T],
        numpy (built on the host: what the trainer passes into its compiled step) or Tensors (built in the
        graph: single-device logits)."""
        if self.cp > 1:                         # tables at the zigzag positions; the ring applies causality
            positions = self.cp_positions[None] if position_ids is None else position_ids
            return build_attention_inputs(self.rope, num_tokens, position_ids=positions, segment_ids=segment_ids,
                                          key_valid=attention_mask, total_len=num_tokens * self.cp, ring=True,
                                          dtype=self.rotary_dtype)
        return build_attention_inputs(self.rope, num_tokens, position_ids=position_ids, segment_ids=segment_ids,
                                      key_valid=attention_mask, flash=self.config.use_flash_attention,
                                      dtype=self.rotary_dtype)

    def forward(self, inputs, cos, sin, allowed, k_caches=None, v_caches=None, write_slot=None):
        """The one forward path: this stage's layers on token ids [B, S] (first stage) or hidden states
        [B, S, H] (SP: [B, S/tp, H]) -> hidden states (final-normed on the last stage). cos, sin, allowed:
        an `AttentionInputs` from `attention_inputs` (unpacked: a NamedTuple argument does not survive
        ms.jit). With the cache arguments (generation) every layer writes its keys/values into its slots."""
        out = self.model(inputs, cos, sin, allowed, k_caches, v_caches, write_slot)
        return out[0] if self.moe else out

    def forward_with_aux(self, inputs, cos, sin, allowed):
        """`forward` over a full sequence and the sum of the MoE layers' router aux losses (unweighted by
        aux_loss_coef; 0 for a dense model)."""
        out = self.model(inputs, cos, sin, allowed)
        return out if self.moe else (out, ops.zeros((), ms.float32))

    def aux_loss(self, input_ids):
        """coef x the summed router aux loss of a plain causal forward of `input_ids` (0 for a dense model)."""
        cos, sin, allowed = self.attention_inputs(input_ids.shape[1])
        return self.config.aux_loss_coef * self.forward_with_aux(_to_tensor(input_ids), cos, sin, allowed)[1]

    def hidden_states(self, inputs, cos=None, sin=None, allowed=None):
        """`forward` over a full sequence: training, pipeline stages, context parallel, logits. cos, sin,
        allowed: `attention_inputs(...)` (packed documents, padding); None: the plain causal sequence."""
        cos, sin, allowed = self._full_inputs(inputs, cos, sin, allowed)
        return self.forward(inputs, cos, sin, allowed)

    def chunk_hidden_states(self, chunk, inputs, cos=None, sin=None, allowed=None):
        """`hidden_states` of model chunk `chunk` (a Python int) of a pipeline rank (0: the whole stage when it
        holds one chunk): token ids [B, S] into the first stage's chunk 0, else hidden states [B, S, H] (SP:
        [B, S/tp, H]). MoE: (hidden states, the chunk's summed router aux loss)."""
        if cos is None:
            cos, sin, allowed = self.attention_inputs(inputs.shape[1] * self.chunk_seq_split[chunk])
        return self.model.chunk_forward(chunk, inputs, cos, sin, allowed)

    def _full_inputs(self, inputs, cos, sin, allowed):
        if cos is None:
            return self.attention_inputs(inputs.shape[1] * self.input_seq_split)
        return cos, sin, allowed

    def head_logits(self, hidden):
        """fp32 logits [B, S, V] of final hidden states (gathered over the vocabulary under tp)."""
        logits = self.lm_head(hidden).astype(ms.float32)
        return logits if self.gather_vocab is None else self.gather_vocab(logits)

    def logits(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """fp32 logits [B, S, V]. segment_ids [B, S] (packed documents): attend only within a segment."""
        attn = None
        if position_ids is not None or segment_ids is not None or attention_mask is not None:
            attn = self.attention_inputs(input_ids.shape[1], position_ids, segment_ids, attention_mask)
        return self.head_logits(self.hidden_states(input_ids, *(attn or ())))

    def construct(self, input_ids, labels=None, attention_mask=None, position_ids=None):
        # input_ids: [B, S] int; labels: [B, S] aligned with input_ids (HF style, shifted here);
        # attention_mask: [B, S], 1 = real token; position_ids: [B, S]
        logits = self.logits(input_ids, attention_mask, position_ids)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels, self.config.ignore_token_id)

    def loss_sum(self, hidden, targets):
        """The last stage's summed next-token loss: sum over counted targets [B, S] of -log p (fp32 scalar)."""
        if self.chunk_loss is not None:
            # the head's input collective once, then `loss_chunk_tokens` positions at a time: only one chunk's
            # logits [B, chunk, V/tp] (and their gradient) exist at once, the backward recomputes them
            x = hidden if self.lm_head.input_comm is None else self.lm_head.input_comm(hidden)
            chunk, total = self.config.loss_chunk_tokens, None
            for start in range(0, x.shape[1], chunk):
                part = self.chunk_loss(self.lm_head.weight, x[:, start:start + chunk], targets[:, start:start + chunk])
                total = part if total is None else total + part
            return total
        logits = self.lm_head(hidden).astype(ms.float32)                   # [B, S, V/tp], never gathered
        if self.vocab_parallel_loss is None:
            return token_nll(logits, targets, self.config.ignore_token_id).sum()
        return self.vocab_parallel_loss(logits, targets).sum()

    def next_token_loss(self, input_ids, targets, cos=None, sin=None, allowed=None, loss_weight=None):
        """Cross entropy of logits[t] against targets[t] (already shifted; -100 ignored), plus the MoE aux
        loss term (`loss_parts`).

        A packed sample of S+1 ids gives input_ids = ids[:, :-1], targets = ids[:, 1:]; cos, sin, allowed
        are its `attention_inputs` when it holds several documents (positions restart, attention stays inside
        each), else None. With `loss_weight` (the trainer: loss scale / label tokens of the whole global
        batch) the sum times it, so that summing over micro-batches and data-parallel ranks gives the global
        per-token mean; without, the mean over this call's counted targets (of the whole sequence under cp).
        """
        ce, aux = self.loss_parts(input_ids, targets, cos, sin, allowed, loss_weight)
        return ce + aux

    def loss_parts(self, input_ids, targets, cos=None, sin=None, allowed=None, loss_weight=None):
        """(cross-entropy part, aux-loss part) of `next_token_loss`. The aux part is aux_loss_coef x the summed
        layers' router aux loss of this forward (0 for a dense model); with `loss_weight` it is weighted by this
        call's label tokens times loss_weight, so the sum over micro-batches and data-parallel ranks is the
        label-token-weighted mean of the per-forward aux losses (times the loss scale), like the CE part."""
        cos, sin, allowed = self._full_inputs(input_ids, cos, sin, allowed)
        hidden, aux = self.forward_with_aux(input_ids, cos, sin, allowed)
        total = self.loss_sum(hidden, targets)
        if loss_weight is not None:
            return total * loss_weight, self.aux_term(aux, targets, loss_weight)
        count = label_count(targets, self.config.ignore_token_id)
        aux = self.config.aux_loss_coef * aux
        if self.cp > 1:
            total, count = self.cp_sum(total), ops.stop_gradient(self.cp_sum(count))
        return total / ops.maximum(count, 1.0), aux

    def aux_term(self, aux, targets, loss_weight):
        """The trainer's aux part of a micro-batch: aux_loss_coef x its summed router aux loss `aux`, times its
        label tokens (of `targets`) times loss_weight, as its cross-entropy sum is weighted (the pipeline adds
        each stage's layers' term on that stage)."""
        count = ops.stop_gradient(label_count(targets, self.config.ignore_token_id))
        return self.config.aux_loss_coef * aux * count * loss_weight


def _without_unavailable_kernels(config: TeleChat2Config) -> TeleChat2Config:
    """FlashAttention and the fused RmsNorm exist only on Ascend; elsewhere use the primitive formulation."""
    wanted = [k for k in ("use_flash_attention", "use_fused_rms_norm") if getattr(config, k)]
    device = ms.get_context("device_target")
    if not wanted or device == "Ascend":
        return config
    warnings.warn(f"{', '.join(wanted)}: Ascend-only kernels, not available on {device}; "
                  "using the equivalent primitive formulation", stacklevel=3)
    return config.replace(**{k: False for k in wanted})


def _to_tensor(x):
    if isinstance(x, np.ndarray):
        return Tensor(x.astype(np.int32) if x.dtype.kind in "iu" else x)
    return x
