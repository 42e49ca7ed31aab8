"""Ray start/connect, placement groups, job submission, KubeRay manifests."""
