"""Measuring: wall-clock timing, machine limits and floors, the speed benchmark, convergence and Jacobian analysis."""
