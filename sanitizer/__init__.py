"""The sanitizer library: what the stages, the benchmark and your own code call (see README.md, "Layout")."""
