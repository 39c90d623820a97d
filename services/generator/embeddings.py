"""Learned token embeddings (textual inversion / pivotal tuning) for product tokens."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def read_token_embeddings(path: str, tokens: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Token -> 1-D embedding, from a file keyed by token or holding one [n_tokens, dim] tensor."""
    state = load_file(path)
    if all(t in state for t in tokens):
        return {t: state[t].reshape(-1) for t in tokens}
    stacked = next(iter(state.values()))
    stacked = stacked if stacked.ndim == 2 else stacked.reshape(1, -1)
    if stacked.shape[0] != len(tokens):
        raise ValueError(f"embeddings: {path} holds {stacked.shape[0]} rows for {len(tokens)} tokens")
    return dict(zip(tokens, stacked, strict=True))


def set_token_embeddings(pipe, embeddings: dict[str, torch.Tensor]) -> None:
    """Add each token to the tokenizer if new, then set its embedding row (in place on reload)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    new = [t for t in embeddings if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new)
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows are set below
    weight = encoder.get_input_embeddings().weight
    for token, row in embeddings.items():
        if row.numel() != weight.shape[1]:
            raise ValueError(f"embeddings: {token} has width {row.numel()}, the text encoder expects {weight.shape[1]}")
        with torch.no_grad():
            weight[tokenizer.convert_tokens_to_ids(token)] = row.reshape(-1).to(weight.device, weight.dtype)
