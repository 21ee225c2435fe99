"""Speed measurements of the project (scripts, not tests), run from the repository root as
`python -m benchmarks.<script>`: train_step (JAX vs the PyTorch reference), ops (per-op kernels),
inference (the EC fold), scaling (data parallelism), input_pipeline (grain workers). `common`
holds what they share; tests/test_benchmarks.py runs each on a tiny network."""
