"""DA-PTQ: Cross-Space Representation Compensation and Drift-Aware Mixed-Precision Allocation."""
