"""Entailment judges (are two answers the same meaning?) and correctness graders (is an answer right?)."""
