"""The gateway side: the OpenAI HTTP API (gateway), request state (sequence), the scheduler that
batches requests into steps and sends them down a pipeline of stages, chat templates, and the
all-in-one local launcher (``molink-lite serve``)."""
