"""Model families a Hugging Face checkpoint can hold, keyed by config.json's `model_type`.

A family says where its parameters live in our tree (`prefix`), which key table maps them, which config.json
fields must equal our preset's (a mismatch is an error naming the field and both values, never a silent reshape),
and which of the file's tensors are not parameters of ours (buffers, the other half of a two-tower model).
"""

import dataclasses
import re

import ml_collections

from vlm_jax.weights import tables


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    prefix: str                      # our subtree: 'llm' or 'vision'
    table: tuple
    fields: tuple                    # (our config key, config.json key)
    required: dict                   # config.json key -> the only value we implement
    ignored: tuple = ()              # regexes of file tensors that are not our parameters
    sub_config: str = ""             # a whole CLIPModel keeps the tower's fields under 'vision_config'
    bare: tuple = ()                 # (prefix, roots): names saved without `prefix` (newer transformers) get it back

    def canonical(self, name: str) -> str:
        """The table's spelling of a file's tensor name."""
        if self.bare and name.startswith(self.bare[1]):
            return self.bare[0] + name
        return name

    def hf_config(self, raw: dict, where: str) -> dict:
        hf = dict(raw[self.sub_config] if self.sub_config in raw else raw)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling")   # transformers >= 5 nests rope_theta here
        if rope:
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raise ValueError(f"{where}: config.json asks for {kind!r} RoPE scaling; vlm-jax implements plain RoPE")
            hf.setdefault("rope_theta", rope.get("rope_theta"))
        return hf

    def check(self, ours: ml_collections.ConfigDict, raw: dict, where: str) -> None:
        """Raises unless config.json describes exactly our preset."""
        hf = self.hf_config(raw, where)
        for key, value in self.required.items():
            if hf.get(key, value) != value:
                raise ValueError(f"{where}: config.json has {key}={hf[key]!r}; vlm-jax implements {key}={value!r}")
        for ours_key, hf_key in self.fields:
            if hf_key not in hf:
                raise ValueError(f"{where}: config.json lacks {hf_key!r} (the preset has {ours_key}="
                                 f"{ours[ours_key]!r})")
            mine, theirs = ours[ours_key], hf[hf_key]
            same = abs(mine - theirs) <= 1e-12 * abs(theirs) if isinstance(theirs, float) else mine == theirs
            if not same:
                raise ValueError(f"{where}: config.json has {hf_key}={theirs!r} but the model preset "
                                 f"{ours.get('name', '?')!r} has {ours_key}={mine!r}; choose the matching preset "
                                 f"or override the field")

    def is_ignored(self, name: str, tied: bool) -> bool:
        if tied and name == "lm_head.weight":   # some tied checkpoints still carry the (identical) output matrix
            return True
        return any(re.fullmatch(p, name) for p in self.ignored)


QWEN2 = Family(
    name="qwen2", prefix="llm", table=tables.QWEN2,
    fields=(("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
            ("intermediate_size", "intermediate_size"), ("num_layers", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
            ("rope_theta", "rope_theta"), ("rms_norm_eps", "rms_norm_eps"),
            ("tie_embeddings", "tie_word_embeddings"), ("max_position_embeddings", "max_position_embeddings")),
    required={"hidden_act": "silu", "use_sliding_window": False},
    ignored=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)

CLIP = Family(
    name="clip", prefix="vision", table=tables.CLIP_VISION, sub_config="vision_config",
    fields=(("width", "hidden_size"), ("mlp_dim", "intermediate_size"), ("depth", "num_hidden_layers"),
            ("num_heads", "num_attention_heads"), ("image_size", "image_size"), ("patch_size", "patch_size"),
            ("layer_norm_eps", "layer_norm_eps")),
    required={"hidden_act": "quick_gelu", "num_channels": 3},
    bare=("vision_model.", ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")),
    # A whole CLIPModel also holds the text tower and both projections; position_ids is a buffer.
    ignored=(r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale",
             r"vision_model\.embeddings\.position_ids"),
)

# config.json model_type -> family. The only place a new checkpoint family is added.
FAMILIES = {"qwen2": QWEN2, "clip": CLIP, "clip_vision_model": CLIP}


def of(raw: dict, where: str) -> Family:
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: config.json is of model_type {model_type!r} (architectures "
                         f"{raw.get('architectures')}); vlm-jax reads {sorted(FAMILIES)}")
    return FAMILIES[model_type]
