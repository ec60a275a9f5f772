"""The bundled demo: a procedural world of captioned clips (`world`), the text corpus both text encoders learn
from (`corpus`), the frame analysis that reads the world's attributes back off frames (`analysis`), and the
recipe that builds the demo model's two arms (`build`)."""

# How the bundled model is sampled by default (`mimir generate`, the demo workflow, bench/alignment.py).
# Guidance was chosen on the held-out prompts at seed 100 (1, 1.5, 2, 3, 4, 6, 9 tried); the benchmark reports
# seeds 0, 1000, 2000. Above ~3 this small model falls back to attribute combinations it saw in training.
DEMO_STEPS = 25
DEMO_GUIDANCE = 2.0
