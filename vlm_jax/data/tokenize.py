"""Tokenizers and the chat template.

Two tokenizers share one small interface: `WordTokenizer`, a closed-vocabulary word/character tokenizer for the
built-in synthetic tasks (vocab < 128, so tiny LLMs stay cheap), and `HFTokenizer`, a HF `tokenizer.json` (e.g.
Qwen1.5's) read from a local path with the `tokenizers` library.

The chat template is Qwen's ChatML, for both:

    [<|im_start|>system\n{system}<|im_end|>\n]
    <|im_start|>user\n{user text, <image> replaced by V image slots}<|im_end|>\n
    <|im_start|>assistant\n{answer}<|im_end|>\n
    ...

`render_chat` returns the ids and, per id, whether it is an answer token that carries loss (the assistant's text and
the <|im_end|> that closes it: the model must learn to stop).

Stage 1 of the paper's recipe uses LLaVA's `plain` pretraining format instead (`render_plain`): the V image slots,
then the caption and "\n", loss on the caption and "\n"; no roles, no system prompt, the instruction dropped.
`TEMPLATES` maps `data.template` to one of the two.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Protocol

IMAGE_PLACEHOLDER = "<image>"
USER, ASSISTANT = "user", "assistant"


class Tokenizer(Protocol):
    """What the data pipeline, training and generation need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int  # <|im_end|>: closes every turn, generation stops on it
    im_start_id: int
    image_slot_id: int  # placeholder id in the V image slots; the model overwrites their embeddings

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


# ----------------------------------------------------------------------------------------------------------------------
# Closed-vocabulary tokenizer for the synthetic tasks.

_SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<unk>")
_NEWLINE, _SPACE = "\n", "\u2581"  # "▁" marks a space before a spelled-out word (see WordTokenizer)
_PUNCT = tuple("?.,:;'\"!-()/")
_ALNUM = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_PIECE_RE = re.compile(r"\n|[^\S\n]+|\w+|[^\w\s]")


class WordTokenizer:
    """Word-level tokenizer over a fixed word list, with single-character fallback.

    Vocabulary: 5 specials, "\\n", "▁", punctuation, digits, upper-case letters, then `words`. A word in the list is
    one token and carries an implicit leading space when it follows other text. Anything else (e.g. "K7", "3") is
    spelled out character by character with no implicit space; "▁" stands for a space in front of it. So
    `decode(encode(t)) == t` for text made of listed words, digits/capitals and punctuation with single spaces,
    which covers every synthetic question and answer. Unknown characters become <unk> (one per spelled word).
    """

    def __init__(self, words: Sequence[str]):
        pieces = list(_SPECIALS) + [_NEWLINE, _SPACE] + list(_PUNCT) + list(_ALNUM)
        words = list(words) + ["system", USER, ASSISTANT]  # the chat template's role names
        for w in words:
            if not re.fullmatch(r"[a-z]+", w):
                raise ValueError(f"WordTokenizer words must be lower-case ascii letters, got {w!r}")
        extra = sorted(set(words) - set(pieces))
        self.pieces = tuple(pieces + extra)
        self._ids = {p: i for i, p in enumerate(self.pieces)}
        self._words = frozenset(extra)
        self.vocab_size = len(self.pieces)
        self.pad_id, self.im_start_id, self.eos_id, self.image_slot_id, self.unk_id = range(5)
        self._newline_id, self._space_id = self._ids[_NEWLINE], self._ids[_SPACE]

    def __repr__(self) -> str:  # grain validates checkpoints against the repr of the pipeline's parts
        return f"WordTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        spaced = False  # whitespace seen since the last token
        for piece in _PIECE_RE.findall(text):
            if piece == _NEWLINE:
                ids.append(self._newline_id)
                spaced = False
            elif piece.isspace():
                spaced = True
            elif piece in self._words:
                ids.append(self._ids[piece])
                spaced = False
            else:
                if spaced and ids:
                    ids.append(self._space_id)
                chars = [self._ids.get(c) for c in piece]
                ids.extend([self.unk_id] if None in chars else chars)
                spaced = False
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out: list[str] = []
        after_text = False  # the previous piece was a word or character, so a following word needs its space
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary (size {self.vocab_size})")
            piece = self.pieces[i]
            if i < len(_SPECIALS):
                if not skip_special:
                    out.append(piece)
                after_text = False
            elif i == self._space_id:
                out.append(" ")
                after_text = False
            elif i == self._newline_id:
                out.append(piece)
                after_text = False
            else:
                if piece in self._words and after_text:
                    out.append(" ")
                out.append(piece)
                after_text = True
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------------
# HF tokenizer.json (Qwen1.5 and the like).


class HFTokenizer:
    """A local HF `tokenizer.json`, with ChatML special tokens looked up by name.

    The image slots use `image_token` if the vocabulary has it, else the pad token: only their positions matter,
    since the model overwrites those embeddings.
    """

    def __init__(self, path: str, *, pad_token: str = "<|endoftext|>", eos_token: str = "<|im_end|>",
                 im_start_token: str = "<|im_start|>", image_token: str = IMAGE_PLACEHOLDER):
        import tokenizers  # pylint: disable=import-outside-toplevel

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for missing or malformed files
            raise ValueError(f"cannot load tokenizer.json from {path!r}: {e}") from e
        self.path = str(path)

        def lookup(name: str, what: str) -> int:
            i = self._tok.token_to_id(name)
            if i is None:
                raise ValueError(f"tokenizer {path!r} has no {what} token {name!r}")
            return i

        self.pad_id = lookup(pad_token, "pad")
        self.eos_id = lookup(eos_token, "eos")
        self.im_start_id = lookup(im_start_token, "im_start")
        slot = self._tok.token_to_id(image_token)
        self.image_slot_id = self.pad_id if slot is None else slot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)


# ----------------------------------------------------------------------------------------------------------------------
# Chat template.


def render_chat(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], *, num_visual_tokens: int,
                system_prompt: str = "", add_generation_prompt: bool = False
                ) -> tuple[list[int], list[bool], list[int]]:
    """ChatML ids for `turns` [(role, text)], role in {'user', 'assistant'}, per-id answer flags, image slots.

    Every `<image>` in a user turn becomes `num_visual_tokens` copies of `tokenizer.image_slot_id`. With
    `add_generation_prompt`, ends with "<|im_start|>assistant\\n" so that generation continues with the answer.
    Returns (ids, is_answer, slots): ids and is_answer have the same length, is_answer is True on assistant text and
    its <|im_end|>; slots are the ascending positions of the image slots (V per placeholder).
    """
    ids: list[int] = []
    is_answer: list[bool] = []
    slots: list[int] = []

    def emit(new_ids: Sequence[int], answer: bool = False) -> None:
        ids.extend(new_ids)
        is_answer.extend([answer] * len(new_ids))

    newline = tokenizer.encode("\n")

    def header(role: str) -> None:
        emit([tokenizer.im_start_id])
        emit(tokenizer.encode(role + "\n"))

    if system_prompt:
        header("system")
        emit(tokenizer.encode(system_prompt))
        emit([tokenizer.eos_id])
        emit(newline)
    for role, text in turns:
        if role not in (USER, ASSISTANT):
            raise ValueError(f"chat role must be {USER!r} or {ASSISTANT!r}, got {role!r}")
        header(role)
        if role == USER:
            for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
                if k:
                    slots.extend(range(len(ids), len(ids) + num_visual_tokens))
                    emit([tokenizer.image_slot_id] * num_visual_tokens)
                if part:
                    emit(tokenizer.encode(part))
            emit([tokenizer.eos_id])
        else:
            emit(tokenizer.encode(text), answer=True)
            emit([tokenizer.eos_id], answer=True)
        emit(newline)
    if add_generation_prompt:
        header(ASSISTANT)
    return ids, is_answer, slots


def render_plain(tokenizer: Tokenizer, turns: Sequence[tuple[str, str]], *, num_visual_tokens: int,
                 system_prompt: str = "", add_generation_prompt: bool = False
                 ) -> tuple[list[int], list[bool], list[int]]:
    """LLaVA's `plain` format of an (image, caption) record: V image slots, the caption, "\n"; same returns as
    `render_chat`. The user turn contributes only its image (as in LLaVA's preprocess_plain); `system_prompt` is
    ignored. With `add_generation_prompt` (a prompt to caption), just the slots."""
    del system_prompt
    if len(turns) > 2 or (turns and turns[0][0] != USER) or (len(turns) == 2 and turns[1][0] != ASSISTANT):
        raise ValueError(f"the plain format takes one user turn (the image) and one answer, got roles "
                         f"{[r for r, _ in turns]}")
    has_image = bool(turns) and IMAGE_PLACEHOLDER in turns[0][1]
    ids = [tokenizer.image_slot_id] * num_visual_tokens if has_image else []
    slots = list(range(len(ids)))
    is_answer = [False] * len(ids)
    if len(turns) == 2 and not add_generation_prompt:
        answer = tokenizer.encode(turns[1][1]) + tokenizer.encode("\n")
        ids += answer
        is_answer += [True] * len(answer)
    return ids, is_answer, slots


TEMPLATES = {"chatml": render_chat, "plain": render_plain}   # data.template -> renderer
