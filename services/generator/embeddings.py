"""Learned token embeddings (textual inversion / pivotal tuning) for product tokens."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def load_token_embeddings(pipe, path: str, tokens: tuple[str, ...]) -> None:
    """Add `tokens` to the tokenizer (if new) and set their embedding rows from `path`.

    The file maps each token to a 1-D embedding (or holds one `emb_params`/`<token>` 2-D tensor
    with a row per token). Re-loading a retrained product overwrites the rows in place.
    """
    state = load_file(path)
    rows: list[torch.Tensor] = []
    if all(t in state for t in tokens):
        rows = [state[t].reshape(-1) for t in tokens]
    else:
        stacked = next(iter(state.values()))
        stacked = stacked if stacked.ndim == 2 else stacked.reshape(1, -1)
        if stacked.shape[0] != len(tokens):
            raise ValueError(f"embeddings: {path} holds {stacked.shape[0]} rows for {len(tokens)} tokens")
        rows = list(stacked)
    encoders = [(pipe.tokenizer, pipe.text_encoder)]
    for tokenizer, encoder in encoders:
        emb = encoder.get_input_embeddings()
        for token, row in zip(tokens, rows, strict=True):
            if row.shape[0] != emb.weight.shape[1]:
                raise ValueError(f"embeddings: {token} has width {row.shape[0]}, model expects {emb.weight.shape[1]}")
            if tokenizer.convert_tokens_to_ids(token) == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
                tokenizer.add_tokens([token])
                encoder.resize_token_embeddings(len(tokenizer))
                emb = encoder.get_input_embeddings()
            with torch.no_grad():
                emb.weight[tokenizer.convert_tokens_to_ids(token)] = row.to(emb.weight.dtype, emb.weight.device)
