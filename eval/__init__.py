"""Verifiable tasks, answer extraction and scoring, and evaluation of models on them."""
