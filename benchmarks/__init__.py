"""nbdw's benchmarks: the asv suite (``bench_*.py``), the peer harness (``peers.py``) and the
shape table both share (``cases.py``). See ``benchmarks/README.md``."""
