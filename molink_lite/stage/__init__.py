"""The host side: one stage serves a layer range of the model over WebSockets (server), checks every
frame against its configuration (validate), runs it in llama.cpp (engine), samples on the last stage
(sampling), loads the llama.cpp libraries (libpath), reports what the host offers (hostinfo), and
optionally serves its own Prometheus metrics (metrics)."""
