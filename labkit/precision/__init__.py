"""Stage 5, precision: cost model, bit plans, sensitivity, allocation under a budget, Pareto points."""
