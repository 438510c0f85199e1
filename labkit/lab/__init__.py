"""Stage 8, lab: what notebooks and the CLI call (steps, twins, plots, widgets, sweeps); logic stays below."""
