"""Question: what share of a training step's multiply-adds do exact per-sample gradient norms need, before
any implementation overhead: of all layers (``--gqc gns_sample``), and of the LayerNorms only
(``--gqc_sample_norm_layers norm``)?

Per Linear (d_in m, d_out n, T tokens per sample): the cheaper of the ghost Gram products T^2 (m + n) and the
per-sample gradient T m n, against 3 T m n for its forward and backward. The training side also counts
attention's score and value matmuls (3 x 2 T^2 d per layer); the tied head counts as one more Linear. In the
all-layer count biases, LayerNorms and the embedding's index side are small and left out. Per sample, so the
batch size cancels.

    python recipes/benchmarks/gqc_norm_flops.py
"""

from __future__ import annotations


def _train_and_norms(seq: int, d_model: int, n_layer: int, vocab: int, ff_mult: int) -> tuple[int, int]:
    """(training multiply-adds, all-layer per-sample norm multiply-adds) per sample, GPT-2 shapes."""
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
    return train, norms


def norm_share(seq: int, d_model: int, n_layer: int, vocab: int, ff_mult: int = 4) -> float:
    """Multiply-adds of the all-layer per-sample norms / multiply-adds of forward + backward."""
    train, norms = _train_and_norms(seq, d_model, n_layer, vocab, ff_mult)
    return norms / train


def layer_norm_share(seq: int, d_model: int, n_layer: int, vocab: int, ff_mult: int = 4) -> float:
    """The same share for the LayerNorms' per-sample norms only (weight and bias of each).

    Per LayerNorm and token: the normalized input (centering, scaling: 2 d), ``g * x_hat`` (d), the token
    sums of that and of ``g`` (2 d); per sample the squared norms of both (2 d). GPT-2 has ``2 n_layer + 1``.
    """
    train, _ = _train_and_norms(seq, d_model, n_layer, vocab, ff_mult)
    return (2 * n_layer + 1) * (5 * seq * d_model + 2 * d_model) / train


def main() -> None:
    tiny = (64, 64, 2, 256)
    print(
        f"CPU tiny (L2 d64 vocab 256) T=64: all {norm_share(*tiny):.1%}, norm {layer_norm_share(*tiny):.3%}"
    )
    for seq in (128, 256, 512, 1024):
        small = (seq, 768, 12, 50257)
        print(f"GPT-2 small T={seq}: all {norm_share(*small):.1%}, norm {layer_norm_share(*small):.4%}")


if __name__ == "__main__":
    main()
