"""Pure policies of the AgentPool controller: (spec, observed pods, metrics, now) -> decisions.

Nothing here does I/O or reads a clock; `plan.plan` combines the policies into one Plan
that the kopf shell applies.
"""
