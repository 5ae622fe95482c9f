"""The operator's evaluation tools: ``quantfleet eval`` and its reports.

What a device runs itself — golden sets, checks, the runner, logit metrics,
the verdict, statistics — is ``quantfleet.agent.quality``; this package adds
the command line (``cli``), the rendered reports (``report``: rich, Markdown,
HTML with matplotlib) and the comparison of two reports from two machines
(``machines``).
"""
