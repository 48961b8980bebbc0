"""Workloads that repeat themselves, for the prefix and image caches (used by benchmarks.gpu_harness).

* :class:`QuestionsPerImage` — K questions about each of N images. Request ``i`` asks question
  ``i // N`` about image ``i % N``: a round of one question per image, then the next round, so under a
  closed loop an image's follow-up is sent after its first question has been answered (as a user
  asking again would), not beside it.
* :func:`conversation` — a T-turn chat about one screenshot, resent in full every turn (OpenAI style):
  turn t's ``messages`` hold the image, the earlier questions and fixed answers, and question t.
* :func:`follow_up_pairs` — (first question, follow-up) about the same image, for the follow-up TTFT.
"""

from __future__ import annotations

import dataclasses
import json

from benchmarks.corpus import Corpus, Sample

QUESTIONS = (
    "What does this say? Answer in one sentence.",
    "Is there a date in this image? Quote it.",
    "List every number you can read, separated by commas.",
    "Give the main fields as JSON with keys title, date and total.",
    "Which language is the text in?",
    "Summarize the image for a support ticket in two sentences.",
    "Is a warranty or refund clause present? Answer yes or no and quote it.",
    "What is the largest heading?",
)
ANSWERS = (
    "It is a page with a heading, a few lines of text and a total at the bottom.",
    "Yes, there is a date near the top right.",
    "12, 48, 2024, 7.50",
)


class QuestionsPerImage:
    """``sample(i)``: question ``i // num_images`` (of ``questions_per_image``) about image ``i % num_images``."""

    def __init__(self, corpus: Corpus, num_images: int, questions_per_image: int) -> None:
        if questions_per_image > len(QUESTIONS):
            raise ValueError(f"questions_per_image: at most {len(QUESTIONS)}")
        self.images = [corpus.sample(i) for i in range(num_images)]
        self.questions_per_image = questions_per_image

    def __len__(self) -> int:
        return len(self.images) * self.questions_per_image

    def sample(self, index: int) -> Sample:
        index %= len(self)
        image = self.images[index % len(self.images)]
        return dataclasses.replace(image, question=QUESTIONS[index // len(self.images)])


def conversation(image: Sample, turns: int) -> list[Sample]:
    """The ``turns`` requests of one conversation about ``image``, each with the whole history."""
    samples = []
    history: list[dict] = []
    for t in range(turns):
        question = QUESTIONS[t % len(QUESTIONS)]
        content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": question}]
        history.append({"role": "user", "content": content})
        samples.append(dataclasses.replace(image, question=question, messages=json.dumps(history)))
        history.append({"role": "assistant", "content": ANSWERS[t % len(ANSWERS)]})
    return samples


def follow_up_pairs(corpus: Corpus, count: int) -> list[tuple[Sample, Sample]]:
    """(first question, another question) about each of ``count`` images."""
    pairs = []
    for i in range(count):
        image = corpus.sample(i)
        pairs.append(
            (
                dataclasses.replace(image, question=QUESTIONS[0]),
                dataclasses.replace(image, question=QUESTIONS[1]),
            )
        )
    return pairs
