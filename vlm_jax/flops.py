"""Inference and training FLOPs of a VLM configuration, and MFU.

Conventions (a multiply-add is 2 FLOPs):
- A matmul with a weight of n parameters costs 2n FLOPs per token forward, so an LLM of N parameters costs 2N per
  token (the paper's count, FLOPs = 2 N (Q + V); N counts every leaf of the LLM's parameter tree, embedding and
  lm_head included, as the paper's model sizes do). Attention's sequence-length term is reported separately.
- Self-attention over S tokens costs, per layer, 2 matmuls (Q K^T and A V) of 2 S^2 H d_head each: 4 S^2 H d_head
  for the ViT's full attention, half of that, 2 S^2 H d_head, for the LLM's causal attention.
- Backward: a weight matmul needs an activation gradient and a weight gradient, 2x its forward each way. So a
  trained part costs 3x forward (6N per token), a frozen part that gradients flow through 2x forward (4N per
  token), a frozen part nothing flows through (the vision tower) 1x. Attention has no weights but both of its
  operands are activations, so it costs 3x forward whenever gradients pass through it.
Parameter counts come from `vlm_jax.models.vlm.abstract_params(model_cfg)` (shapes only, nothing allocated), never
from hand-typed sizes. What a compressor head costs is the head class's own answer: `flops_per_image` (by default
XLA's cost analysis of the head itself) and `needs_query` (an extra forward LLM pass over the question).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from vlm_jax.models import heads, vlm
from vlm_jax.models.vision import resolve_layer
from vlm_jax.xla_cost import xla_flops  # noqa: F401  (part of this module's interface)


def count_params(tree) -> int:
    """Total number of elements over the leaves (arrays or jax.ShapeDtypeStruct) of a pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _head_class(model_cfg):
    return heads.get(model_cfg.compressor.name)


def param_counts(model_cfg, params=None) -> dict[str, int]:
    """Parameters per part: {'vision', 'compressor', 'projector', 'llm'} -> count.

    params: an (abstract) parameter tree with those top-level keys; by default the model's own
    `abstract_params(model_cfg)`.
    """
    tree = vlm.abstract_params(model_cfg) if params is None else params
    missing = {"vision", "compressor", "projector", "llm"} - set(tree)
    if missing:
        raise ValueError(f"parameter tree lacks top-level part(s) {sorted(missing)}; has {sorted(tree)}")
    return {name: count_params(tree[name]) for name in ("vision", "compressor", "projector", "llm")}


def llm_linear_flops(n_params, tokens):
    """2 N FLOPs per token: the weight matmuls of a model with N parameters (broadcasts over arrays)."""
    return 2.0 * n_params * tokens


def attention_flops(num_layers: int, num_heads: int, head_dim: int, seq_len, *, causal: bool):
    """Forward FLOPs of the attention score and mixing matmuls over seq_len tokens (see module docstring)."""
    full = 4.0 * num_layers * num_heads * head_dim * seq_len * seq_len
    return full / 2 if causal else full


def vision_tokens(vision_cfg) -> int:
    """Tokens the ViT runs over: the patch grid plus the class token."""
    grid = vision_cfg.image_size // vision_cfg.patch_size
    if grid < 1:
        raise ValueError(f"image_size {vision_cfg.image_size} is smaller than patch_size {vision_cfg.patch_size}")
    return grid * grid + 1


def visual_tokens(model_cfg) -> int:
    """V, the visual tokens the LLM receives (config validation makes every head produce exactly num_tokens)."""
    return int(model_cfg.compressor.num_tokens)


def compressor_flops(model_cfg) -> float:
    """Forward FLOPs of the compressor head for one image, as the head class reports them (`flops_per_image`;
    the head only: vision tower and projector are counted separately)."""
    return float(_head_class(model_cfg).flops_per_image(model_cfg))


def needs_query_pass(model_cfg) -> bool:
    """Whether the head conditions on the question, which costs an extra forward LLM pass over it."""
    return bool(_head_class(model_cfg).needs_query)


@dataclasses.dataclass(frozen=True)
class InferenceFlops:
    """Forward FLOPs of answering one query with one image, by part.

    llm: 2 N (Q + V); llm_attention: causal attention over Q + V; vision: 2 N_vision T + ViT attention;
    compressor: the head (its flops_per_image); projector: 2 N_projector V; query_pass: the extra LLM pass over the
    question of a query-conditioned head (QueCC).
    """

    llm: float
    llm_attention: float
    vision: float
    compressor: float
    projector: float
    query_pass: float

    @property
    def paper(self) -> float:
        """The paper's count: the LLM's weight matmuls only."""
        return self.llm

    @property
    def total(self) -> float:
        return self.llm + self.llm_attention + self.vision + self.compressor + self.projector + self.query_pass


def vision_blocks_run(model_cfg) -> int:
    """Blocks the tower runs: up to the deepest layer its compressor head reads (LLaVA's penultimate layer skips
    the last block; models/vision.py)."""
    taps = _head_class(model_cfg).vision_layers(model_cfg.compressor, model_cfg.vision)
    return max((resolve_layer(i, model_cfg.vision.depth) for i in taps), default=0)


def _vision_forward(model_cfg, n_vision: int) -> float:
    """2 N per token for the patch embedding (over the patches) and for each block run (over patches + class
    token), plus their attention. Position and class embeddings and the norms outside the blocks do not multiply."""
    v = model_cfg.vision
    tokens = vision_tokens(v)
    patch = v.patch_size * v.patch_size * 3 * v.width
    outside = patch + v.width + tokens * v.width + 4 * v.width   # patch, class and position embeddings, 2 norms
    per_block = (n_vision - outside) / v.depth
    blocks = vision_blocks_run(model_cfg)
    return (llm_linear_flops(patch, tokens - 1) + llm_linear_flops(per_block * blocks, tokens)
            + attention_flops(blocks, v.num_heads, v.width // v.num_heads, tokens, causal=False))


def llm_matmul_params(llm_cfg, n_llm: int) -> tuple[int, int]:
    """(with the output projection, without it): the LLM's parameters that multiply activations. The input
    embedding is a lookup, not a matmul; a tied table is used once, as the output projection. Without it: what a
    pass that stops at the last hidden state (QueCC's query pass) multiplies."""
    table = llm_cfg.vocab_size * llm_cfg.hidden_size
    with_head = n_llm - (0 if llm_cfg.get("tie_embeddings", False) else table)
    return with_head, with_head - table


def _llm_forward(llm_cfg, n_llm: int, tokens: int) -> tuple[float, float]:
    """(weight matmuls, causal attention) of one forward pass over `tokens` tokens, `n_llm` the parameters that
    multiply."""
    return (llm_linear_flops(n_llm, tokens),
            attention_flops(llm_cfg.num_layers, llm_cfg.num_heads, llm_cfg.head_dim, tokens, causal=True))


def inference_breakdown(model_cfg, *, text_tokens: int, question_len: int | None = None,
                        compressor_flops_per_image: float | None = None, params=None) -> InferenceFlops:
    """Per-part forward FLOPs of one query: text_tokens Q of text plus V visual tokens through the LLM (prefill).

    question_len: the question a query-conditioned head (`needs_query`, e.g. QueCC) encodes with its extra LLM
    pass (default: all Q text tokens); charged only for such heads. compressor_flops_per_image overrides the
    head's own count.
    """
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    counts = param_counts(model_cfg, params)
    v = visual_tokens(model_cfg)
    llm, llm_attention = _llm_forward(model_cfg.llm, counts["llm"], text_tokens + v)
    query_pass = 0.0
    if needs_query_pass(model_cfg):
        q = text_tokens if question_len is None else question_len
        query_pass = sum(_llm_forward(model_cfg.llm, llm_matmul_params(model_cfg.llm, counts["llm"])[1], q))
    if compressor_flops_per_image is None:
        compressor_flops_per_image = compressor_flops(model_cfg)
    return InferenceFlops(
        llm=llm,
        llm_attention=llm_attention,
        vision=_vision_forward(model_cfg, counts["vision"]),
        compressor=float(compressor_flops_per_image),
        projector=llm_linear_flops(counts["projector"], v),
        query_pass=query_pass,
    )


def inference_flops(model_cfg, *, text_tokens: int, llm_only: bool = False, **kwargs) -> float:
    """Forward FLOPs of one query: everything, or with llm_only the paper's 2 N (Q + V)."""
    if llm_only:
        counts = param_counts(model_cfg, kwargs.get("params"))
        return llm_linear_flops(counts["llm"], text_tokens + visual_tokens(model_cfg))
    return inference_breakdown(model_cfg, text_tokens=text_tokens, **kwargs).total


def train_step_flops(model_cfg, *, batch_size: int, seq_len: int, train_llm: bool, train_vision: bool,
                     question_len: int | None = None, compressor_flops_per_image: float | None = None,
                     params=None, images_per_sequence: int = 1, text_only: bool = False) -> float:
    """FLOPs of one training step on batch_size sequences of seq_len tokens (visual slots included), one image each
    (`images_per_sequence` K when rows are packed: the image terms below count K times; attention is computed
    over the whole row whatever the segments, so it counts as it runs).

    Per sequence, with N the LLM's parameters that multiply (llm_matmul_params: not the input embedding, a lookup),
    N_body those without the output projection, F_x a part's forward FLOPs, and attention causal:
        LLM weights      (6 if train_llm else 4) * N * seq_len       (frozen: forward + activation gradients)
        LLM attention    3 * 2 * L * H * d_head * seq_len^2          (gradients always pass through it)
        vision tower     (3 if train_vision else 1) * F_vision       (2 N_vision per patch token + attention)
        compressor       3 * F_compressor                            (always trained)
        projector        3 * 2 * N_projector * V                     (always trained)
        query pass       2 * N_body * question_len + causal attention (heads with needs_query; forward only, up
                                                                      to the last hidden state)
    question_len: the question length the query pass runs over (data.question_len); default seq_len.
    text_only (train.text_only): the step runs no image path, so only the two LLM terms count.
    Checked against XLA's cost analysis of the jitted step (tests/test_flops_xla.py).
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    counts = param_counts(model_cfg, params)
    llm_cfg = model_cfg.llm
    attention = attention_flops(llm_cfg.num_layers, llm_cfg.num_heads, llm_cfg.head_dim, seq_len, causal=True)
    n_matmul, _ = llm_matmul_params(llm_cfg, counts["llm"])
    per_seq = (6.0 if train_llm else 4.0) * n_matmul * seq_len + 3.0 * attention
    if text_only:
        return batch_size * per_seq
    per_image = shared_image_flops(model_cfg, train_vision=train_vision,
                                   question_len=seq_len if question_len is None else question_len, params=params)
    if compressor_flops_per_image is None:
        compressor_flops_per_image = compressor_flops(model_cfg)
    per_image += 3.0 * compressor_flops_per_image
    per_image += 3.0 * llm_linear_flops(counts["projector"], visual_tokens(model_cfg))
    return batch_size * (per_seq + images_per_sequence * per_image)


def shared_image_flops(model_cfg, *, train_vision: bool, question_len: int, params=None) -> float:
    """Training FLOPs per image that do not depend on V: the tower ((3 if trained else 1) x its forward) and the
    query pass of a `needs_query` head (forward only, over question_len tokens). An M3 step (elastic V) runs them
    once for all its scales."""
    counts = param_counts(model_cfg, params)
    out = (3.0 if train_vision else 1.0) * _vision_forward(model_cfg, counts["vision"])
    if needs_query_pass(model_cfg):
        out += sum(_llm_forward(model_cfg.llm, llm_matmul_params(model_cfg.llm, counts["llm"])[1], question_len))
    return out


def mfu(flops_per_step: float, step_seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the hardware's peak."""
    for name, value in (("flops_per_step", flops_per_step), ("step_seconds", step_seconds),
                        ("peak_flops_per_second", peak_flops_per_second)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return flops_per_step / step_seconds / peak_flops_per_second
