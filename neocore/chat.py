"""The chat transcript format shared by `neocore chat` and the server's chat route: GPT-Neo is
a plain language model, so a conversation is written as a script it continues."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

USER, MODEL = "You:", "Neo:"
STOPS = ["\n" + USER, "\n\n"]  # the model's turn ends where it would start the user's


def turn(role: str, content: str) -> str:
    """One message as a transcript line: user and assistant turns are labelled, a system
    message stands alone at its place."""
    content = content.strip()
    if role == "user":
        return f"{USER} {content}\n"
    if role == "assistant":
        return f"{MODEL} {content}\n"
    return f"{content}\n"


def transcript(messages: Iterable[Mapping[str, str]]) -> str:
    """The text the model continues to answer: the messages, then the model's label."""
    return "".join(turn(m["role"], m["content"]) for m in messages) + MODEL


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """A transcript's tokens. What the messages say is text: a '<|endoftext|>' typed by the user
    or written by the model is not the token that ends a document."""
    return tokenizer.encode(text, allow_special=False)


class Answer:
    """An answer's text as turn() keeps it (without whitespace at either end), given chunk by
    chunk as it comes: whitespace waits until text follows it. The text it gives in all is
    the whole answer's .strip()."""

    def __init__(self) -> None:
        self.held, self.began = "", False

    def add(self, chunk: str) -> str:
        """What of the answer can be shown once chunk has come ("" while only whitespace is
        new)."""
        self.held += chunk
        text = self.held.rstrip()
        if not text:
            return ""
        shown = text if self.began else text.lstrip()
        self.held, self.began = self.held[len(text):], True
        return shown


def stripped(chunks: Iterable[str]) -> Iterator[str]:
    """An answer's chunks as Answer shows them, skipping those with nothing to show."""
    answer = Answer()
    for chunk in chunks:
        shown = answer.add(chunk)
        if shown:
            yield shown
