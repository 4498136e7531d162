"""The teacher stage: backends, Ray Data actors and their layout on a cluster, the teacher's space
and its cache."""
