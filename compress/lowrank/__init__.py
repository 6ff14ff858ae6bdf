"""Low-rank approximation: SVD engines and rank selection."""
