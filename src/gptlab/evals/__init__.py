"""Evaluation beyond loss: log-likelihood requests and multiple-choice metrics as lm-evaluation-harness
computes them (`gptlab.evals.harness`), attention maps (`gptlab.evals.attention`).

The submodules are imported on use; this package imports nothing itself.
"""
