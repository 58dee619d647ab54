"""`Example`: one synthetic item as the rest of the system sees it (an image or its words, questions, answers)."""

from __future__ import annotations

import dataclasses

import numpy as np

from vlm_jax.data.tokenize import ASSISTANT, IMAGE_PLACEHOLDER, USER


@dataclasses.dataclass(frozen=True)
class Example:
    """One synthetic example. image: uint8[S, S, 3]."""

    id: str
    family: str
    kind: str  # question type, e.g. 'count_color' or 'read'
    image: np.ndarray | None   # None: the scene is described in words (`description`) instead
    question: str
    answer: str
    more: tuple[tuple[str, str], ...] = ()   # further (question, answer) turns about the same image
    description: str = ""

    @property
    def prompt(self) -> str:
        """The first user turn: the image placeholder (or the scene in words), a newline, the question."""
        return prompt_text(self.question) if self.image is not None else f"{self.description}\n{self.question}"

    def turns(self) -> list[tuple[str, str]]:
        """The example as a chat: the user shows the image (or describes the scene) and asks, the assistant
        answers (then any follow-ups)."""
        turns = [(USER, self.prompt), (ASSISTANT, self.answer)]
        for question, answer in self.more:
            turns += [(USER, question), (ASSISTANT, answer)]
        return turns


def prompt_text(question: str) -> str:
    """The user turn of a synthetic example: the image placeholder, a newline, the question."""
    return f"{IMAGE_PLACEHOLDER}\n{question}"
