"""QueCC: query-based convolutional cross-attention (Li, Goyal, Semedo, Kolter 2024), as published with the paper.

    query float[B, D_llm] --Linear+LN--> float[B, Dv], added to every patch token of the selected layer
    q-path:   (selected + query) -> Linear -> GELU -> Linear -> LN -> grid -> depthwise conv, kernel = stride = k
              (k = g / sqrt(V), valid padding) -> sqrt(V) x sqrt(V) downsampled tokens
    k/v-path: the taps (CLIP-L: 12, 16, 22, 23) concatenated (4 Dv wide) -> separate Linear -> GELU -> Linear -> LN
    each downsampled token attends (8 heads) to the k x k tokens of its own region -> float[B, V, Dv]

The model's projector follows. All LayerNorms use eps 1e-6. At V = g*g every region holds one token, so the
attention weights are 1 and the output no longer depends on the q-path (nor on the question): the q-path then gets
no gradient. That is a property of the published design, not of this code.

Nested (elastic V, `model.compressor.nested_tokens`): text projection, q/k/v MLPs and cross-attention are shared by
every V of the set; only the depthwise downsampling differs (its kernel is k x k, k = g / sqrt(V)), so there is one
per V: `q_downsample` for V = num_tokens (the largest) and `q_downsample_v{V}` for the others. A set of one V is
the published head's parameter tree exactly. Each extra V costs k*k*Dv + Dv parameters, against a whole head for
separate per-V heads.
"""

import flax.linen as nn

from vlm_jax.models import layers
from vlm_jax.models.heads.base import CrossAttention, Head, ProjectionMLP, grid_side, option, to_regions, vision_taps

EPS = 1e-6


class QueCC(Head):
    """features {layer: float[B, 1 + g*g, Dv]}, query float[B, D_llm] -> float[B, V, Dv]."""

    DEFAULTS = dict(
        kv_layers=None,   # HF indices of the k/v taps; None: CLIP-L's (12, 16, 22, 23), scaled for other depths
        num_heads=8,      # cross-attention heads (head_dim = Dv / num_heads)
    )
    needs_query = True
    NESTS = True

    @classmethod
    def vision_layers(cls, cfg, vision_cfg):
        return (vision_cfg.select_layer,) + vision_taps(cfg, vision_cfg)

    def downsample(self, v: int, d: int, g: int):
        """The depthwise k x k, stride-k convolution that pools the q-path to V = v tokens (one per V)."""
        k = g // grid_side(self.cfg.name, v, g)
        return nn.Conv(d, (k, k), strides=(k, k), padding="VALID", feature_group_count=d, use_bias=True,
                       dtype=self.dtype, name="q_downsample" if v == self.cfg.num_tokens else f"q_downsample_v{v}",
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                (None, None, None, "compressor_embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("compressor_embed",)))

    @nn.compact
    def __call__(self, features, query=None, num_tokens=None):
        if query is None:
            raise ValueError("compressor head 'quecc' needs the query embedding (the question's LLM hidden state)")
        x = self.selected(features)                                               # [B, g, g, Dv]
        b, g, _, d = x.shape
        v = self.tokens(num_tokens)
        side = grid_side(self.cfg.name, v, g)

        # The question conditions every token of the selected layer (the only place the query enters).
        q_text = layers.dense(d, ("embed", "compressor_hidden"), True, self.dtype, "text_proj")(query)
        q_text = layers.LayerNorm(EPS, ("compressor_embed",), name="text_norm")(q_text)
        q = ProjectionMLP(d, EPS, self.dtype, name="q_mlp")(x.astype(self.dtype) + q_text[:, None, None, :])
        # Depthwise (one filter per channel) downsampling: a learned, query-aware pooling of each k x k region.
        if self.is_initializing():   # create the kernel of every V of the set, not only the one called
            for other in self.nested_tokens():
                if other != v:
                    self.downsample(other, d, g)(q)
        q = self.downsample(v, d, g)(q)
        q = q.reshape(b * side * side, 1, d)                                      # one query per region

        multi = self.multi_level(features).astype(self.dtype)                      # [B, g, g, taps * Dv]
        keys = to_regions(ProjectionMLP(d, EPS, self.dtype, name="k_mlp")(multi), side)   # [B*V, k*k, Dv]
        values = to_regions(ProjectionMLP(d, EPS, self.dtype, name="v_mlp")(multi), side)
        out = CrossAttention(option(self.cfg, QueCC, "num_heads"), self.dtype, name="attn")(q, keys, values)
        return out.reshape(b, side * side, d)
