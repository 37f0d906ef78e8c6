"""Analytic memory and compute model of R1V3 training layouts (TP/PP/VPP/DP/CP), validated on tiny CPU runs."""
