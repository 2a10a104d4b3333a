"""Moderation of model output (and optionally input) through a pluggable backend."""
