"""The search: study config, search space, samplers with the M³ prior, warm start, Ray driver and workers."""
