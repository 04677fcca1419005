"""tools wing: what measures and pictures the floors below, never what runs them. Imported only by the CLI, the
benches (`bench/`) and the tests; no floor below imports it.

Modules, one job each:

* `draw.fabric`, `draw.matrix`, `draw.perf` — matplotlib pictures (Agg, no GUI) of a fabric's topology and the EP
  latency comparison, of a pool and a fleet simulation, of the decode Pareto front;
* `bench` — the engine benchmark harness behind `matrixstack engine bench` (a seeded request set, prefill and
  decode throughput, TTFT, TPOT);
* `calibrate` — `matrixstack calibrate`: measures this machine and writes the `local` fabric's figures.
"""
