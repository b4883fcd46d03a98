"""The shared base under `factory`, `trainers` and `eval`: storage locations (URIs)."""
