"""Retrofitting pretrained models: the `--to` structure language, `uptrain` and its recipes, the CLI."""

from kvlab.retrofit.structures import convert, parse_structure
from kvlab.retrofit.uptrain import RECIPES, UptrainError, uptrain

__all__ = ["RECIPES", "UptrainError", "convert", "parse_structure", "uptrain"]
