"""The miniature capability zoo: a base LLM and per-capability SFT experts trained on CPU in minutes."""
