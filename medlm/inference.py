"""Inference: a trained model loaded from wherever a user names it, ready to write symptoms
(``medlm.generate.generate``)."""

from __future__ import annotations

import os


def load_model_for_inference(model_uri: str, registered_model: str = "medlm"):
    """(tokenizer, model) from the registry (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
    ``models:/NAME/latest``, a bare version), a logged model (``models:/m-MODEL_ID``), a run
    (``runs:/RUN_ID/model``), an MLflow model directory, a ``save_pretrained`` directory, a
    .gguf file or an offline base name."""
    from medlm.modeling import load_tokenizer_and_model
    from medlm.tokens import ensure_pad_token
    from medlm.tracking import load_logged_model, resolve_model_uri

    resolved = resolve_model_uri(model_uri, registered_model)
    if os.path.isfile(resolved) or (os.path.isdir(resolved) and
                                    not os.path.isfile(os.path.join(resolved, "MLmodel"))):
        return load_tokenizer_and_model(resolved)
    tokenizer, model = load_logged_model(resolved, asked=model_uri)
    return ensure_pad_token(tokenizer, model)
