"""Ray Data stages of the labeling pipeline: sample, early stop, cluster + entropy."""
