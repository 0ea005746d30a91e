"""What crosses the network between gateway and stages: the binary frame format and hidden-state
codecs (codec), ordered request/reply messaging over one WebSocket (channel), the cluster-secret
handshake every link starts with (auth) and TLS certificates and contexts (tls)."""
