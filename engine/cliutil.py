"""Argument helpers shared by the CLI verbs."""
from __future__ import annotations

import argparse


def whole_number(name: str):
    """An argparse type that accepts whole numbers (also written as 1e4) and names the option when it refuses."""
    def parse(text: str) -> int:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got '{text}'") from None
        if v != v or v in (float("inf"), float("-inf")) or v != int(v):
            raise argparse.ArgumentTypeError(f"{name} must be a whole number, got '{text}'")
        return int(v)
    return parse
