"""ldpipe: learning dynamics of LLM fine-tuning as declarative Dagster pipelines."""
__version__ = "0.1.0"
