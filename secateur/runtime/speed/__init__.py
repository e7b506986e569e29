"""Speed where the model is served: the serving target's engines, the width sweep that picks
`budget.multiple_of: auto`, the per-layer latency model behind latency budgets, and alternating
whole-model timing in llama.cpp and PyTorch."""
