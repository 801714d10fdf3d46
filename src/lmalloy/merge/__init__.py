"""Model merging: methods as pure functions (methods.py), a planning and streaming engine
(engine.py), greedy soups (greedy.py), LoRA adapter merging and LoraHub (lora.py)."""
