"""Tools around the runtime, never imported by it: serving and engine benchmarks, codec fidelity,
a slow-link TCP relay, random-weight test models, the README architecture-table generator and
``molink-lite status`` (a gateway's /v1/stats in the terminal)."""
