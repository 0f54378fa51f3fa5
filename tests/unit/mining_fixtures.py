"""Small synthetic reports for the mining tests (benchmarks/synthetic_reports.py, few rows)."""

from __future__ import annotations

from bench_scripts import load_benchmark

synthetic = load_benchmark("synthetic_reports.py")
Synthetic = synthetic.Synthetic
write_report = synthetic.write_report
