"""Model replicas: in-process (tp=1) or a tensor-parallel group of Ray actors (tp>1)."""
