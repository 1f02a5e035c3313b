"""Kernels under both training and evaluation: the output head computed where it is read or never built whole
(:mod:`ops.head`), per-token NLL and the competition's ME from logits or from the head's input
(:mod:`ops.token_values`)."""
