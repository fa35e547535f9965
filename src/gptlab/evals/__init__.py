"""Evaluation beyond loss: attention maps (`gptlab.evals.attention`).

The submodules are imported on use; this package imports nothing itself.
"""
