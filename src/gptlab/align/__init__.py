"""Alignment: reward models, PPO, DPO and GRPO, trained on the built-in preference and prompt
sets (`gptlab.datasets.load_preferences`, `load_prompts`) or the user's own, with rewards
that are Python functions over (prompt, completion) (`gptlab.align.rewards`) or a reward
model checkpoint.

The submodules are imported on use; this package imports nothing itself.
"""
