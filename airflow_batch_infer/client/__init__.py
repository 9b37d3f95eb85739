"""The streaming gRPC client: tensor mapping, request sizing, retries and the per-chunk loop."""
