"""The VLM: vision tower -> compressor head -> projector -> LLM, with visual embeddings in reserved slots.

The data pipeline reserves exactly V image slots in the token sequence (`image_positions`); the model writes the V
projected visual embeddings there (scatter with mode='drop', so a text-only row, whose positions are all out of
range, is untouched). A packed row (data/packing.py) holds K examples: K images, K x V slots, segment ids in the
attention mask. Shapes never depend on data, so one compiled step serves every batch.

Elastic V (vlm_jax/elastic.py): a model whose head nests (`model.compressor.nested_tokens`) takes `num_tokens=V` for
any V of the set, on a sequence with V image slots; unset, it is the published single-V model.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlm_jax.models import heads, layers, torch_init
from vlm_jax.models.llm import LLM
from vlm_jax.models.vision import VisionTower


class Projector(nn.Module):
    """LLaVA's `mlp2x_gelu`: Linear(Dv -> D) -> GELU (exact) -> Linear(D -> D). float[B, V, Dv] -> float[B, V, D]."""
    out_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = layers.dense(self.out_dim, ("vision_embed", "projector_hidden"), True, self.dtype, "linear_1")(x)
        x = nn.gelu(x, approximate=False)
        return layers.dense(self.out_dim, ("projector_hidden", "embed"), True, self.dtype, "linear_2")(x)


PROJECTORS = {"mlp2x_gelu": Projector}

# The arguments of `VLM.__call__`, the batch keys training and generation feed the model.
MODEL_INPUTS = ("pixels", "tokens", "attention_mask", "image_positions", "question_tokens", "question_mask")
# What a text-only step feeds it (train.text_only: pixels None, no image path).
TEXT_INPUTS = ("tokens", "attention_mask", "image_positions")


class VLM(nn.Module):
    cfg: ml_collections.ConfigDict

    def setup(self):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        if cfg.projector.name not in PROJECTORS:
            raise ValueError(f"unknown model.projector.name {cfg.projector.name!r}; known: {sorted(PROJECTORS)}")
        self.head_cls = heads.get(cfg.compressor.name)
        self.vision = VisionTower(cfg.vision, dtype)
        self.compressor = self.head_cls(cfg.compressor, cfg.vision, cfg.llm, dtype)
        self.projector = PROJECTORS[cfg.projector.name](cfg.llm.hidden_size, dtype)
        self.llm = LLM(cfg.llm, dtype)

    def query_embedding(self, question_tokens, question_mask):
        """The LLM's last-layer hidden state at the question's last real token, float[B, D]; no gradient flows
        back into the LLM through it (the query only conditions the compressor)."""
        return jax.lax.stop_gradient(self.llm.last_hidden(question_tokens, question_mask))

    def encode_images(self, pixels, question_tokens=None, question_mask=None, num_tokens=None):
        """pixels float[B, S, S, 3] -> visual embeddings float[B, V, D] ready for the LLM. A packed batch holds K
        images per row (float[B, K, S, S, 3], questions int[B, K, Lq]) -> float[B, K * V, D], in slot order.
        num_tokens: V (elastic: a V of the set); a tuple of them gives a tuple of embeddings, one per V, from one
        pass of the tower and of the query (M3)."""
        if pixels.ndim == 5:
            if isinstance(num_tokens, tuple):
                raise ValueError("elastic V over packed rows is not supported (train.elastic with data.pack_examples)")
            b, k = pixels.shape[:2]
            flat = lambda x: None if x is None else x.reshape((b * k,) + x.shape[2:])  # noqa: E731
            visual = self.encode_images(flat(pixels), flat(question_tokens), flat(question_mask), num_tokens)
            return visual.reshape(b, k * visual.shape[1], visual.shape[2])
        features = self.vision(pixels, self.head_cls.vision_layers(self.cfg.compressor, self.cfg.vision))
        query = None
        if self.head_cls.needs_query:
            if question_tokens is None:
                raise ValueError(f"compressor head {self.cfg.compressor.name!r} needs question_tokens")
            query = self.query_embedding(question_tokens, question_mask)
        if isinstance(num_tokens, tuple):
            return tuple(self.projector(self.compressor(features, query, v)) for v in num_tokens)
        return self.projector(self.compressor(features, query, num_tokens))

    def embed_inputs(self, tokens, image_positions, visual):
        """Token embeddings with the visual embeddings written into the image slots: float[B, T, D]."""
        x = self.llm.embed_tokens(tokens)
        rows = jnp.arange(tokens.shape[0])[:, None]
        return x.at[rows, image_positions].set(visual.astype(x.dtype), mode="drop")

    def hidden_states(self, pixels, tokens, attention_mask, image_positions, question_tokens=None,
                      question_mask=None, num_tokens=None):
        """The LLM's final-norm hidden states float[B, T, D] (the chunked training loss applies the output layer).
        pixels None: a text-only batch (train.text_only), whose slots are all out of range, so the visual embeddings
        would be dropped anyway: the tower, compressor and projector do not run, the LLM reads the tokens alone."""
        if pixels is None:
            x = self.llm.embed_tokens(tokens)
        else:
            x = self.embed_inputs(tokens, image_positions,
                                  self.encode_images(pixels, question_tokens, question_mask, num_tokens))
        hidden, _ = self.llm(x, attention_mask)
        return hidden

    def hidden_states_per_scale(self, pixels, texts, question_tokens=None, question_mask=None):
        """M3: texts {V: (tokens, attention_mask, image_positions)}, the batch trimmed to each V -> {V: hidden
        float[B, L_V, D]}, one LLM pass per V; the tower and the query pass run once for all of them."""
        scales = tuple(texts)
        visuals = self.encode_images(pixels, question_tokens, question_mask, scales)
        return {v: self.llm(self.embed_inputs(texts[v][0], texts[v][2], visual), texts[v][1])[0]
                for v, visual in zip(scales, visuals)}

    def logits(self, hidden):
        """float[B, T, D] final-norm hidden states -> float32[B, T, vocab]."""
        return self.llm.logits(hidden)

    def __call__(self, pixels, tokens, attention_mask, image_positions, question_tokens=None, question_mask=None,
                 num_tokens=None):
        """Next-token logits float32[B, T, vocab] for a batch in the pipeline's layout (V = num_tokens image slots;
        default model.compressor.num_tokens)."""
        return self.llm.logits(self.hidden_states(pixels, tokens, attention_mask, image_positions, question_tokens,
                                                  question_mask, num_tokens))


def dummy_inputs(cfg: ml_collections.ConfigDict, batch: int = 1, seq_len: int = 8, question_len: int = 4):
    """Abstract inputs (ShapeDtypeStructs) of the shapes `VLM.__call__` takes, for init and shape analysis."""
    s, v = cfg.vision.image_size, cfg.compressor.num_tokens
    shapes = dict(pixels=(batch, s, s, 3), tokens=(batch, seq_len), attention_mask=(batch, seq_len),
                  image_positions=(batch, v), question_tokens=(batch, question_len),
                  question_mask=(batch, question_len))
    return {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32 if k == "pixels" else jnp.int32) for k in MODEL_INPUTS}


# model.head_init: 'flax' (lecun-normal kernels, zero biases) | 'torch' (the authors' PyTorch initialisation of the
# compressor and projector; the full-size configs' default)
HEAD_INITS = ("flax", "torch")


def init_fn(cfg: ml_collections.ConfigDict, batch: int = 1, seq_len: int = 8, question_len: int = 4):
    """`rng -> boxed params` (logical axis metadata kept) for jax.jit/eval_shape, stored in `cfg.param_dtype`
    (computation runs in `cfg.dtype` whatever the storage; bfloat16 storage halves the memory of frozen parts)."""
    model = VLM(cfg)
    inputs = dummy_inputs(cfg, batch, seq_len, question_len)
    param_dtype = jnp.dtype(cfg.get("param_dtype", "float32"))

    head_init = cfg.get("head_init", "flax")
    if head_init not in HEAD_INITS:
        raise ValueError(f"model.head_init={head_init!r}; choose one of {HEAD_INITS}")

    def init(rng):
        zeros = {k: jnp.zeros(x.shape, x.dtype) for k, x in inputs.items()}
        params = dict(model.init(rng, **zeros)["params"])
        if head_init == "torch":   # the parts trained from scratch start where the authors' PyTorch modules do
            scheme = heads.get(cfg.compressor.name).TORCH_INIT
            if "compressor" in params:
                params["compressor"] = torch_init.reinit(params["compressor"], jax.random.fold_in(rng, 1), scheme)
            params["projector"] = torch_init.reinit(params["projector"], jax.random.fold_in(rng, 2), "torch")
        return jax.tree.map(lambda p: p.astype(param_dtype), params)
    return init


class _ByContent:
    """A config as a cache key: equal when their JSON is (a config read back from config.json is the same model)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg, self.key = cfg, cfg.to_json_best_effort(sort_keys=True)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return self.key == other.key


@functools.lru_cache(maxsize=16)
def _abstract_init(cfg: _ByContent):
    return jax.eval_shape(init_fn(cfg.cfg), jax.random.key(0))


def abstract_init(cfg: ml_collections.ConfigDict):
    """The boxed parameter tree of `init_fn(cfg)` as ShapeDtypeStructs (logical axes kept, nothing allocated).
    Shapes depend on the config alone, so a process traces each model's init once: a grid cell asks about 12 times
    (layouts of its stages and its evaluation, FLOPs counts), at a quarter of a second of tracing each."""
    return _abstract_init(_ByContent(cfg))


def abstract_params(cfg: ml_collections.ConfigDict):
    """Parameter tree of ShapeDtypeStructs (no allocation), keys 'vision', 'compressor', 'projector', 'llm'."""
    tree = nn.meta.unbox(abstract_init(cfg))
    tree.setdefault("compressor", {})   # parameter-free heads (none, avgpool) have no subtree
    return tree
