"""The evaluation stage: mteb retrieval tasks fanned out as Ray tasks over an eval cache."""
