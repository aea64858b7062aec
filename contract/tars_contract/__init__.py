"""What the operator, the agents, Prometheus and the chart agree on: the operator <-> agent
contract (contract.py) and every metric name (metric_names.py).

Its own package, so that the operator image carries the contract without the agent runtime."""
