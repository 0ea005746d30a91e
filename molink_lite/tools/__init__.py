"""Tools around the runtime, never imported by it: serving and engine benchmarks, codec fidelity,
a slow-link TCP relay, random-weight test models and the README architecture-table generator."""
