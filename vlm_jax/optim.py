"""Optimizer and parameter groups: which parameters train, and how.

One mechanism decides freezing: an ordered list of (regex, action) rules over '/'-joined parameter names
('llm/layers/self_attn/q_proj/kernel'); the first matching rule wins, and a parameter that matches no rule is an
error. `train.stage` is sugar for the paper's two stages:

- 'projector' (stage 1): compressor + projector train; vision tower and LLM frozen;
- 'full' (stage 2): compressor + projector + LLM train; the vision tower is frozen unless `train.train_vision`.

Frozen parameters are split off before differentiation, so they get neither gradients nor optimizer state.
"""

import math
import re

import optax
from flax import traverse_util

STAGES = {
    "projector": (("^compressor/", "train"), ("^projector/", "train"), ("^llm/", "freeze")),
    "full": (("^compressor/", "train"), ("^projector/", "train"), ("^llm/", "train")),
}
ACTIONS = ("train", "freeze")


def param_rules(train_cfg) -> tuple:
    """The ordered (regex, action) rules for `config.train` (explicit `param_rules` win over `stage`)."""
    explicit = tuple(train_cfg.get("param_rules", ()) or ())
    if explicit:
        rules = tuple(tuple(r.split(":", 1)) if isinstance(r, str) else tuple(r) for r in explicit)
    else:
        if train_cfg.stage not in STAGES:
            raise ValueError(f"train.stage={train_cfg.stage!r}; choose one of {sorted(STAGES)} "
                             f"(or give train.param_rules)")
        vision = ("^vision/", "train" if train_cfg.get("train_vision", False) else "freeze")
        rules = STAGES[train_cfg.stage] + (vision,)
    for rule in rules:
        if len(rule) != 2 or rule[1] not in ACTIONS:
            raise ValueError(f"train.param_rules entry {rule!r} must be 'regex:action' with action in {ACTIONS}")
    return rules


def trainable_names(params, rules) -> set:
    """Names of trainable parameters; raises if any parameter matches no rule."""
    names = traverse_util.flatten_dict(params, sep="/").keys()
    compiled = [(re.compile(p), a) for p, a in rules]
    trainable, unmatched = set(), []
    for name in names:
        action = next((a for p, a in compiled if p.search(name)), None)
        if action is None:
            unmatched.append(name)
        elif action == "train":
            trainable.add(name)
    if unmatched:
        raise ValueError(f"parameters match no rule in train.param_rules/stage: {unmatched[:5]}"
                         f"{' ...' if len(unmatched) > 5 else ''}")
    return trainable


def split(params, trainable: set):
    """params -> (trainable subtree, frozen subtree); `merge` undoes it."""
    flat = traverse_util.flatten_dict(params, sep="/")
    train = {k: v for k, v in flat.items() if k in trainable}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def merge(trainable, frozen):
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def schedule(train_cfg):
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `end_lr_ratio` x lr (0: the LLaVA/HF
    recipe; 1: constant after warmup)."""
    steps = int(train_cfg.steps)
    warmup = min(math.ceil(train_cfg.warmup_ratio * steps), steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=train_cfg.get("end_lr_ratio", 0.0) * train_cfg.lr)


def make_optimizer(train_cfg):
    """Gradient clipping + AdamW (betas 0.9/0.999, no weight decay by default, as the paper's recipe)."""
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                    weight_decay=train_cfg.weight_decay),
    )
