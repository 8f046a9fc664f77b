"""Deployment helpers: TLS certificates, SuperNode keys and docker compose files (no Flower imports)."""
