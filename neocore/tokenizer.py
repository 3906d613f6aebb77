"""Placeholder replaced by the BPE tokenizer."""
from pathlib import Path


class Tokenizer:
    @staticmethod
    def files_present(folder: Path) -> bool:
        return False
