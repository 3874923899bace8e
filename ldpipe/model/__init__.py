"""Models: tokenizer, GPT-NeoX factory, pretraining, checkpoints (lm), LoRA adapters (lora), generation, probe
scoring, and the base-model stage (base)."""
