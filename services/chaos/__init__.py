"""``scls chaos``: deploy a real local scls system, break it on purpose, report what was lost.

Modules: :mod:`.deployment` (the processes: Redis with AOF, ingest, schedulers, workers),
:mod:`.workload` (greedy requests over REST and their ledger), :mod:`.faults` (each fault),
:mod:`.fuzz` (schemathesis and hand-made bodies), :mod:`.report` (the JSON and the table),
:mod:`.command` (the Typer command). docs/reliability.md describes the faults and results.
"""
