"""The chat transcript's answer text, streamed: whatever the chunking, what chat.Answer shows
adds up to the whole answer's str.strip(), and nothing it shows is held back past the text."""
import random

from neocore import chat

PIECES = ["", " ", "  ", "\n", "\t", "a", "b c", " d ", "é", "\u3000", "x\n", " \r\n", "\u00a0"]


def test_answer_shows_the_stripped_text_whatever_the_chunking():
    rng = random.Random(7)
    for _ in range(2000):
        chunks = [rng.choice(PIECES) for _ in range(rng.randint(0, 8))]
        answer = chat.Answer()
        shown = [answer.add(c) for c in chunks]
        whole = "".join(chunks)
        assert "".join(shown) == whole.strip(), chunks
        # shown as soon as text follows: everything up to the last non-space so far
        for i in range(len(chunks)):
            assert "".join(shown[:i + 1]) == "".join(chunks[:i + 1]).strip(), chunks


def test_stripped_skips_the_chunks_with_nothing_to_show():
    assert list(chat.stripped([" ", "\n", "Hi", " ", " there", "\n\n"])) == ["Hi", "  there"]
