"""Helpers shared by config files."""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse `get_config`'s argument "k1=v1,k2=v2" with types taken from `defaults`; unknown keys fail."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config argument {item!r} is not key=value")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value.lower() in ("1", "true", "yes")
        else:
            out[key] = kind(value)
    return out


def train_config(**overrides) -> ml_collections.ConfigDict:
    """`config.train` with the paper's recipe as defaults (AdamW, warmup 3% + cosine, no weight decay)."""
    cfg = dict(
        stage="projector",        # 'projector' (stage 1) | 'full' (stage 2); see vlm_jax/optim.py
        train_vision=False,       # the vision tower is frozen unless this is set
        param_rules=(),           # explicit ('regex:train|freeze', ...) rules; override `stage` when given
        steps=1000,
        batch_size=256,           # global batch
        lr=1e-3,
        warmup_ratio=0.03,
        end_lr_ratio=0.0,         # cosine decays to this fraction of lr (0: to zero, the paper's recipe)
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,
        skip_nonfinite=False,     # a NaN/inf loss or gradient norm: False stops the run naming the step; True skips
        loss_chunk=0,             # >0: output layer + loss over this many positions at a time (big vocabularies)
        text_only=False,          # text-only batches (no image slots; checked): the LLM alone, no tower/head/projector
        log_every=10,
        eval_every=0,             # validation loss (+ teacher-forced exact match) every this many steps; 0 = off
        eval_batches=0,           # batches per evaluation; 0 = the whole validation split
        checkpoint_every=500,
        keep_checkpoints=2,
        peak_flops_per_device=0.0,  # MFU denominator; 0 = vendor table or a measured matmul peak
        # Elastic V (vlm_jax/elastic.py): one model for a set of V. mode '' (off) | 'mqt' (a random V of `tokens`
        # each step) | 'm3' (the mean loss over all of `tokens` each step); model.compressor.num_tokens = max(tokens)
        elastic=dict(mode="", tokens=()),
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1, strict: bool = False) -> ml_collections.ConfigDict:
    """`config.mesh`: sizes of the ('data', 'fsdp', 'tensor') axes; -1 takes the remaining devices. A parameter
    dimension the mesh does not divide is replicated with a warning naming it and its cost, or, with `strict`,
    refused at start."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, strict=strict))
