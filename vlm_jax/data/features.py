"""A conversation -> the fixed-shape text arrays of one example (the batch contract, minus pixels).

Layout of one example of total length L = seq_len + V (V image slots on top of a text budget of seq_len, so every V
in a grid sees the same text):

    tokens[t]          input ids, right-padded with pad_id; the V slots hold tokenizer.image_slot_id
    targets[t]         tokens[t + 1], 0 where there is no next token
    loss_mask[t]       1.0 where targets[t] is an answer token (assistant text or the <|im_end|> closing it)
    attention_mask[t]  1 on real tokens
    image_positions    the V slot positions, ascending; L (out of range) for every entry of a text-only example
    question_tokens    the first user turn without the placeholder, right-padded to Lq, keeping its END
    question_mask      1 on real question tokens

Sequences longer than L are cut at L. A cut that would drop any image slot, or leave no answer token to learn from,
makes the record bad (`too_long`) instead of a silently wrong example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import errors
from vlm_jax.data.tokenize import (
    ASSISTANT,
    IMAGE_PLACEHOLDER,
    TEMPLATES,
    USER,
    Tokenizer,
)


@dataclasses.dataclass(frozen=True)
class TextLayout:
    """Fixed text shapes of a batch."""

    seq_len: int  # text budget; the example length is L = seq_len + num_visual_tokens
    question_len: int  # Lq
    num_visual_tokens: int  # V
    system_prompt: str = ""
    template: str = "chatml"   # a name in tokenize.TEMPLATES: 'chatml' (Qwen) | 'plain' (LLaVA pretraining)

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template={self.template!r}; choose one of {sorted(TEMPLATES)}")
        for name in ("seq_len", "question_len", "num_visual_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"TextLayout.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def length(self) -> int:
        """L, the token length of every example."""
        return self.seq_len + self.num_visual_tokens


def check_turns(turns: Sequence[tuple[str, str]], has_image: bool) -> None:
    """Raises BadRecord unless `turns` is a user/assistant alternation with the right number of placeholders."""
    if not turns:
        raise errors.BadRecord(errors.EMPTY_CONVERSATION, "no turns")
    roles = [r for r, _ in turns]
    if USER not in roles or ASSISTANT not in roles:
        raise errors.BadRecord(errors.ONE_SIDED_CONVERSATION, f"roles {roles}")
    expected = [USER if k % 2 == 0 else ASSISTANT for k in range(len(roles))]
    if roles != expected:
        raise errors.BadRecord(errors.BAD_ROLES, f"roles must alternate user/assistant from user, got {roles}")
    counts = [text.count(IMAGE_PLACEHOLDER) for _, text in turns]
    want = 1 if has_image else 0
    if sum(counts) != want:
        raise errors.BadRecord(errors.IMAGE_PLACEHOLDERS,
                               f"{sum(counts)} {IMAGE_PLACEHOLDER} placeholders for a record "
                               f"{'with' if has_image else 'without'} an image (need {want})")
    if sum(counts[1::2]):  # roles alternate from user, so odd turns are the assistant's
        raise errors.BadRecord(errors.IMAGE_PLACEHOLDERS, f"{IMAGE_PLACEHOLDER} in an assistant turn")


def question_text(turns: Sequence[tuple[str, str]]) -> str:
    """The first user turn without the image placeholder: what a query-conditioned compressor reads."""
    for role, text in turns:
        if role == USER:
            return text.replace(IMAGE_PLACEHOLDER, " ").strip()
    return ""


def _question_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode(question) or [tokenizer.eos_id]


def encode_question(tokenizer: Tokenizer, question: str, question_len: int) -> tuple[np.ndarray, np.ndarray]:
    """int32[Lq] tokens and mask; keeps the END of a long question (its last token feeds the compressor).

    An empty question becomes the single token eos_id, so there is always a last real token to read.
    """
    ids = _question_ids(tokenizer, question)[-question_len:]
    tokens = np.full(question_len, tokenizer.pad_id, np.int32)
    mask = np.zeros(question_len, np.int32)
    tokens[:len(ids)] = ids
    mask[:len(ids)] = 1
    return tokens, mask


def encode_conversation(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], layout: TextLayout, *,
                        has_image: bool) -> dict[str, np.ndarray]:
    """One training example's text arrays (module docstring) from [(role, text)] turns. Raises BadRecord."""
    check_turns(turns, has_image)
    try:
        ids, is_answer, slots = TEMPLATES[layout.template](
            tokenizer, turns, num_visual_tokens=layout.num_visual_tokens, system_prompt=layout.system_prompt)
    except ValueError as e:   # e.g. a multi-turn record under the single-turn plain format
        raise errors.BadRecord(errors.BAD_ROLES, str(e)) from e
    length = layout.length
    if slots and slots[-1] >= length:
        raise errors.BadRecord(errors.TOO_LONG, f"image slots end at {slots[-1] + 1} > length {length}")
    ids, is_answer = ids[:length], is_answer[:length]
    # Position 0 is never a target, so an answer must survive somewhere in 1..L-1.
    if not any(is_answer[1:]):
        raise errors.BadRecord(errors.TOO_LONG, f"no answer token within length {length}")
    n = len(ids)
    tokens = np.full(length, tokenizer.pad_id, np.int32)
    tokens[:n] = ids
    targets = np.zeros(length, np.int32)
    targets[:n - 1] = ids[1:]
    loss_mask = np.zeros(length, np.float32)
    loss_mask[:n - 1] = is_answer[1:]
    attention_mask = np.zeros(length, np.int32)
    attention_mask[:n] = 1
    image_positions = np.asarray(slots if has_image else [length] * layout.num_visual_tokens, np.int32)
    question = question_text(turns)
    question_tokens, question_mask = encode_question(tokenizer, question, layout.question_len)
    example = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "image_positions": image_positions,
        "question_tokens": question_tokens,
        "question_mask": question_mask,
    }
    n_question = len(_question_ids(tokenizer, question))
    if n_question > layout.question_len:
        example[errors.NOTE_KEY] = (errors.QUESTION_TRUNCATED, f"question of {n_question} tokens, first "
                                    f"{n_question - layout.question_len} dropped (data.question_len="
                                    f"{layout.question_len})")
    return example


def encode_prompt(tokenizer: Tokenizer, user_text: str, layout: TextLayout) -> dict[str, np.ndarray]:
    """Prompt-only arrays for generation: one user turn, then "<|im_start|>assistant\\n", right-padded to L.

    `user_text` holds the placeholder where the image goes (e.g. "<image>\\nwhat is written in the top left?"); a text
    with none is a text-only prompt. Returns tokens, attention_mask int32[L]; prompt_length int32[] (the answer
    starts there); image_positions int32[V]; question_tokens, question_mask int32[Lq]. Raises ValueError when the
    prompt does not fit in L or has more than one placeholder.
    """
    n_placeholders = user_text.count(IMAGE_PLACEHOLDER)
    if n_placeholders > 1:
        raise ValueError(f"prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders, at most 1 allowed")
    turns = [(USER, user_text)]
    ids, _, slots = TEMPLATES[layout.template](tokenizer, turns, num_visual_tokens=layout.num_visual_tokens,
                                               system_prompt=layout.system_prompt, add_generation_prompt=True)
    length = layout.length
    if len(ids) >= length:  # leave room for at least one generated token
        raise ValueError(f"prompt of {len(ids)} tokens does not fit in length {length}: {user_text[:80]!r}")
    tokens = np.full(length, tokenizer.pad_id, np.int32)
    tokens[:len(ids)] = ids
    attention_mask = np.zeros(length, np.int32)
    attention_mask[:len(ids)] = 1
    image_positions = np.asarray(slots or [length] * layout.num_visual_tokens, np.int32)
    question_tokens, question_mask = encode_question(tokenizer, question_text(turns), layout.question_len)
    return {
        "tokens": tokens,
        "attention_mask": attention_mask,
        "prompt_length": np.asarray(len(ids), np.int32),
        "image_positions": image_positions,
        "question_tokens": question_tokens,
        "question_mask": question_mask,
    }
