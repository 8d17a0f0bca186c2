"""Benchmarks of Courier: fan-out (bench/fanout.py) and ledger ingest (bench/ingest.py)."""
