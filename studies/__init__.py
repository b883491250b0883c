"""Everything that reads a study: the Pareto front, held-out re-scoring, export (recipe, mergekit, model), reports."""
