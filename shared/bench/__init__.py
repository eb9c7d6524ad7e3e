"""Benchmark tooling shared by ``scls bench``, ``scls simulate`` and ``scls fidelity``:
workloads (traces, arrivals) and reports (results.json, report.md, plots)."""
