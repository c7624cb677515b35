"""The router: one endpoint for every base, in front of the gateways that announce themselves in Redis."""
