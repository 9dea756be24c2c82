"""Question: what share of a training step's multiply-adds do exact per-sample gradient norms of all layers
need, before any implementation overhead?

Per Linear (d_in m, d_out n, T tokens per sample): the cheaper of the ghost Gram products T^2 (m + n) and the
per-sample gradient T m n, against 3 T m n for its forward and backward. The training side also counts
attention's score and value matmuls (3 x 2 T^2 d per layer); the tied head counts as one more Linear. Biases,
LayerNorms and the embedding's index side are small and left out. Per sample, so the batch size cancels.

    python recipes/benchmarks/gqc_norm_flops.py
"""

from __future__ import annotations


def norm_share(seq: int, d_model: int, n_layer: int, vocab: int, ff_mult: int = 4) -> float:
    """Multiply-adds of the per-sample norms / multiply-adds of forward + backward, GPT-2 shapes."""
    linears = [
        (d_model, 3 * d_model),
        (d_model, d_model),
        (d_model, ff_mult * d_model),
        (ff_mult * d_model, d_model),
    ]
    train = norms = 0
    for _ in range(n_layer):
        for m, n in linears:
            train += 3 * seq * m * n
            norms += min(seq * seq * (m + n), seq * m * n)
        train += 3 * 2 * seq * seq * d_model
    train += 3 * seq * d_model * vocab
    norms += min(seq * seq * (d_model + vocab), seq * d_model * vocab)
    return norms / train


def main() -> None:
    print(f"CPU tiny (L2 d64 vocab 256) T=64: {norm_share(64, 64, 2, 256):.1%}")
    for seq in (128, 256, 512, 1024):
        print(f"GPT-2 small T={seq}: {norm_share(seq, 768, 12, 50257):.1%}")


if __name__ == "__main__":
    main()
