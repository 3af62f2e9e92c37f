"""Arithmetic questions graded by difficulty, a second training domain for the demo
(``python -m se_ray.demo.arithmetic.build`` writes ``se_ray/demo/arithmetic_questions.jsonl``)."""
