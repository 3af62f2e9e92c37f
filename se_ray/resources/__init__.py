"""What a job asks of a cluster, read before it runs (`se-ray plan`): ``model`` the memory and
throughput figures, ``cluster`` the node types of a cluster file or a live cluster, ``groups``
the actor groups a config starts, ``placement`` Ray's autoscaler and raylet rules replayed,
``estimate`` the GPU-hours, ``verb`` the command. All pure but ``verb``'s --reserve."""
