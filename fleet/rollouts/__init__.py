"""Staged precision rollouts: the spec, the gate statistics, the engine."""
