"""The gateway side, in the order a request meets it: the OpenAI HTTP API (gateway; openai_schema
validates requests, http_limits caps connections, auth checks API keys, chat renders templates),
the router (replicas, balance, failover and replay), request state (sequence), the batch policy
(scheduler), one pipeline of stages (pipeline, over the links in chain), the all-in-one local
launcher (``molink-lite serve``), and what an operator sees: Prometheus metrics (metrics) and the
dashboard's static page (web/)."""
