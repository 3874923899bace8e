"""Probe sets: construction from the data (build), LLM-made types (llm_types), and the two pipeline stages that write
them (stage, model_stage)."""
