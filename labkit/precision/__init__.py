"""Stage 5, precision: the cost model, per-layer bit plans, sensitivity, allocation under a budget, Pareto
points."""
