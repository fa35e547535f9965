"""Serving: `gptlab serve`, an OpenAI-compatible HTTP API over continuous batching, and a chat page.

    scheduler  one thread owns the model: requests join and leave the running batch at every decode step
    schema     the OpenAI request fields served, checked, and OpenAI's error shape
    app        the FastAPI routes (completions, chat, models, health, metrics, the page), SSE streaming
    static/    the chat page: plain HTML, CSS and JavaScript

The submodules are imported on use; this package imports nothing itself.
"""
