"""Shared test helpers (no tests in here): in-memory tokenizers and other small fixtures' builders."""
