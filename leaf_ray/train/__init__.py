"""The training stage: Ray Train workers distilling the teacher into the student."""
