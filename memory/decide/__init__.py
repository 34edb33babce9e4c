"""Turning neighbours into decisions: voting rules, confidence and abstention, explanations, pruning weights.

`voting` (VotingRule and the weight of each neighbour), `confidence` (vote confidence, calibration),
`out_of_memory` (the k-th neighbour test of a query unlike anything in memory, and why an abstention happened),
`explain` (a decision traced to its neighbours), `pruning` (reliability counts -> weights), `classify`
(search -> vote -> explain -> gate -> re-rank, over a memory's public methods).
"""
