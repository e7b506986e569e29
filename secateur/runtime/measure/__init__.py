"""What a run measures and reports: perplexity, zero-shot tasks, timing, the report and model card."""
