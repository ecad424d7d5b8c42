"""Merge methods. Each turns its config and the opened sources into a `MergePlan`."""
