"""The pipeline stages: one thin module per stage (load, call sanitizer, write), run as `python -m stages <name>`."""
