"""MedLM: fine-tune a small causal language model on disease -> symptoms, tracked in MLflow."""

from medlm.errors import MedLMError

__all__ = ["MedLMError"]
__version__ = "0.1.0"
