"""Quality as the device measures it: golden sets, checks, answers, logit metrics, verdicts.

The same evaluator serves the agent's pre-flight (before it activates a
variant), the operator's ``quantfleet eval`` and the fleet's statistics: a
golden item is answered through the serving pipeline (``answer``), checked
(``checks``), paired with the baseline's answer (``compare``), scored by
teacher forcing (``metrics``) and judged (``verdict``, ``stats``). Nothing
here imports fleet code or operator-side dependencies (scipy, matplotlib).
"""
