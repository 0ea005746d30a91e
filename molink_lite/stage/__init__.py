"""The host side: one stage serves a layer range of the model over WebSockets (server: connections, roles,
dispatch; conn_slots: who may connect; fencing: which gateway controls it; next_link: the link to the next
stage), checks every frame against its configuration (validate), runs steps per lane (runner) in llama.cpp
(engine), samples on the last stage (sampling), loads the llama.cpp libraries (libpath), reports what the host
offers (hostinfo), and optionally serves its own Prometheus metrics (metrics)."""
