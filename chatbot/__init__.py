"""Empathetic Chat: a small empathetic dialogue model with retrieval, emotion detection and a crisis screen."""

from chatbot.generation import PRESETS, GenerationSettings

__all__ = ["PRESETS", "GenerationSettings"]
