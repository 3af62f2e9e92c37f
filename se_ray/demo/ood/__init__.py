"""Out-of-distribution question sets: facts from sources other than the geography relations the
demo trains on (``python -m se_ray.demo.ood.build`` writes ``se_ray/demo/ood_*.jsonl``)."""
