"""Quality evaluation: golden sets, paired comparisons between variants, verdicts.

The modules the agent's pre-flight needs (golden, runner, metrics, stats,
results, verdict) import nothing beyond the agent's own dependencies; only
``report`` (matplotlib, jinja2) is operator-side, and nothing here imports it.
"""
