"""Registered attention implementations: ``get(name)``, ``list_impls(pattern)``, ``register(name)``."""

from attention_impls.base import AttentionModule, EmptyConfig, UnsupportedCase
from attention_impls.registry import ImplSpec, get, list_impls, register

__all__ = ["AttentionModule", "EmptyConfig", "ImplSpec", "UnsupportedCase", "get", "list_impls", "register"]
