"""One tokenization per text: ids equal open_clip's tokenizer, the truncation flag from the same encoding."""

from __future__ import annotations

import torch


def test_ids_and_truncation_from_one_encoding(tiny_encoder):
    tokenizer = tiny_encoder.loaded.tokenizer
    context = tokenizer.context_length
    fits = " ".join(["cat"] * (context - 2))  # SOT + context-2 words + EOT: exactly the context
    over = fits + " cat"
    texts = ["a red circle", fits, over, "two " * 200]
    calls = []
    encode = tokenizer.encode
    tokenizer.encode = lambda text: calls.append(text) or encode(text)
    try:
        ids, truncated = tiny_encoder.tokenize(texts)
    finally:
        del tokenizer.encode
    assert calls == texts  # each text encoded once
    assert torch.equal(ids, tokenizer(texts))
    assert truncated == [False, False, True, True]
