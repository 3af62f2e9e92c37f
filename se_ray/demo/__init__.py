"""Demo question sets shipped with se-ray (``*.jsonl``, described in README.md) and, in ``geo``,
the build-time script that writes the geography questions."""
