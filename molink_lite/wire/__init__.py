"""What crosses the network between gateway and stages: the binary frame format and hidden-state
codecs (codec) and ordered request/reply messaging over one WebSocket (channel)."""
