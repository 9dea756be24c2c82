"""Analysis of collected gradients, projections and GQC runs (statistics, similarity, plots)."""
