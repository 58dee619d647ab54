"""Key tables: which Hugging Face tensor each vlm-jax parameter comes from, and how its axes map.

A table is read top to bottom: (our name under the family's prefix, HF tensor name, layout). `{i}` stands for a
layer index; a scanned LLM (`llm/layers/...`, leading 'layers' axis) stacks layer i's tensor at index i.

A layout says how an HF tensor becomes ours without copying anything but the slice a device owns: the HF tensor is
first viewed with some of its axes split (`groups`: which of the split axes each HF axis holds, e.g. q_proj's
[heads*head_dim, embed] -> [heads, head_dim, embed]), then transposed (`axes`, numpy's convention: our axis k is
split axis axes[k]). Both steps are exact and invertible, so export runs the same table backwards.
"""

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    groups: tuple      # HF axis j holds split axes groups[j] (row-major)
    axes: tuple        # our axis k is split axis axes[k]

    def split_shape(self, ours: tuple) -> tuple:
        shape = [0] * len(ours)
        for k, a in enumerate(self.axes):
            shape[a] = ours[k]
        return tuple(shape)

    def hf_shape(self, ours: tuple) -> tuple:
        split = self.split_shape(ours)
        return tuple(math.prod(split[a] for a in group) for group in self.groups)

    def read(self, hf_slice, ours: tuple, index: tuple) -> np.ndarray:
        """Our block `index` (one slice per our axis, step 1) read from `hf_slice` (anything indexable by slices,
        e.g. safetensors' lazy slice): only the HF rows that hold the block are read."""
        split = self.split_shape(ours)
        want = [range(n) for n in split]
        for k, a in enumerate(self.axes):
            want[a] = range(*index[k].indices(ours[k]))
        hf_index, block_shape, local = [], [], []
        for group in self.groups:
            first, rest = group[0], group[1:]
            inner = math.prod(split[a] for a in rest)
            hf_index.append(slice(want[first].start * inner, want[first].stop * inner))
            block_shape += [len(want[first])] + [split[a] for a in rest]
            local += [slice(None)] + [slice(want[a].start, want[a].stop) for a in rest]
        block = np.asarray(hf_slice[tuple(hf_index)]).reshape(block_shape)
        return block[tuple(local)].transpose(self.axes)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """The whole HF tensor for our whole array (export)."""
        split = np.transpose(ours, np.argsort(self.axes))
        return split.reshape(self.hf_shape(ours.shape))


def plain(ndim: int) -> Layout:
    return Layout(tuple((a,) for a in range(ndim)), tuple(range(ndim)))


SAME_1D, SAME_2D = plain(1), plain(2)
LINEAR = Layout(((0,), (1,)), (1, 0))                    # torch Linear [out, in] -> kernel [in, out]
HEADS_IN = Layout(((0, 1), (2,)), (2, 0, 1))             # [heads*head_dim, embed] -> [embed, heads, head_dim]
HEADS_BIAS = Layout(((0, 1),), (0, 1))                   # [heads*head_dim] -> [heads, head_dim]
HEADS_OUT = Layout(((0,), (1, 2)), (1, 2, 0))            # [embed, heads*head_dim] -> [heads, head_dim, embed]
CONV = Layout(((0,), (1,), (2,), (3,)), (2, 3, 1, 0))   # torch Conv2d [out, in, kh, kw] -> [kh, kw, in, out]


# Qwen1.5 = transformers' Qwen2ForCausalLM. Our names are under `llm/`.
QWEN2 = (
    ("embed_tokens/embedding", "model.embed_tokens.weight", SAME_2D),
    ("layers_{i}/input_layernorm/weight", "model.layers.{i}.input_layernorm.weight", SAME_1D),
    ("layers_{i}/self_attn/q_proj/kernel", "model.layers.{i}.self_attn.q_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/k_proj/kernel", "model.layers.{i}.self_attn.k_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/v_proj/kernel", "model.layers.{i}.self_attn.v_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/o_proj/kernel", "model.layers.{i}.self_attn.o_proj.weight", HEADS_OUT),
    ("layers_{i}/post_attention_layernorm/weight", "model.layers.{i}.post_attention_layernorm.weight", SAME_1D),
    ("layers_{i}/gate_proj/kernel", "model.layers.{i}.mlp.gate_proj.weight", LINEAR),
    ("layers_{i}/up_proj/kernel", "model.layers.{i}.mlp.up_proj.weight", LINEAR),
    ("layers_{i}/down_proj/kernel", "model.layers.{i}.mlp.down_proj.weight", LINEAR),
    ("norm/weight", "model.norm.weight", SAME_1D),
    ("lm_head/kernel", "lm_head.weight", LINEAR),        # absent when the embedding is tied
)

# CLIP's vision half (CLIPVisionModel, or the vision_model of a whole CLIPModel). Our names are under `vision/`.
CLIP_VISION = (
    ("class_embedding", "vision_model.embeddings.class_embedding", SAME_1D),
    ("patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight", CONV),
    ("position_embedding", "vision_model.embeddings.position_embedding.weight", SAME_2D),
    ("pre_layrnorm/norm/scale", "vision_model.pre_layrnorm.weight", SAME_1D),
    ("pre_layrnorm/norm/bias", "vision_model.pre_layrnorm.bias", SAME_1D),
    ("layers_{i}/layer_norm1/norm/scale", "vision_model.encoder.layers.{i}.layer_norm1.weight", SAME_1D),
    ("layers_{i}/layer_norm1/norm/bias", "vision_model.encoder.layers.{i}.layer_norm1.bias", SAME_1D),
    ("layers_{i}/self_attn/q_proj/kernel", "vision_model.encoder.layers.{i}.self_attn.q_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/q_proj/bias", "vision_model.encoder.layers.{i}.self_attn.q_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/k_proj/kernel", "vision_model.encoder.layers.{i}.self_attn.k_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/k_proj/bias", "vision_model.encoder.layers.{i}.self_attn.k_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/v_proj/kernel", "vision_model.encoder.layers.{i}.self_attn.v_proj.weight", HEADS_IN),
    ("layers_{i}/self_attn/v_proj/bias", "vision_model.encoder.layers.{i}.self_attn.v_proj.bias", HEADS_BIAS),
    ("layers_{i}/self_attn/o_proj/kernel", "vision_model.encoder.layers.{i}.self_attn.out_proj.weight", HEADS_OUT),
    ("layers_{i}/self_attn/o_proj/bias", "vision_model.encoder.layers.{i}.self_attn.out_proj.bias", SAME_1D),
    ("layers_{i}/layer_norm2/norm/scale", "vision_model.encoder.layers.{i}.layer_norm2.weight", SAME_1D),
    ("layers_{i}/layer_norm2/norm/bias", "vision_model.encoder.layers.{i}.layer_norm2.bias", SAME_1D),
    ("layers_{i}/fc1/kernel", "vision_model.encoder.layers.{i}.mlp.fc1.weight", LINEAR),
    ("layers_{i}/fc1/bias", "vision_model.encoder.layers.{i}.mlp.fc1.bias", SAME_1D),
    ("layers_{i}/fc2/kernel", "vision_model.encoder.layers.{i}.mlp.fc2.weight", LINEAR),
    ("layers_{i}/fc2/bias", "vision_model.encoder.layers.{i}.mlp.fc2.bias", SAME_1D),
    ("post_layernorm/norm/scale", "vision_model.post_layernorm.weight", SAME_1D),
    ("post_layernorm/norm/bias", "vision_model.post_layernorm.bias", SAME_1D),
)
