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


def stripped(chunks: Iterable[str]) -> Iterator[str]:
    """An answer's chunks as they come, its text as turn() keeps it (without whitespace at
    either end): whitespace waits until text follows it."""
    held, began = "", False
    for chunk in chunks:
        held += chunk
        text = held.rstrip()
        if text:
            yield text if began else text.lstrip()
            held, began = held[len(text):], True
