"""Recipes: whole jobs (train, predict, compare, demo) composed from the reusable components."""
