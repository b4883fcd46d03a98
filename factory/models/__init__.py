"""The product's model loading: where a model lives (`locate`, light: no torch), loading hub ids,
URIs or local folders offline (`loading`), and local folders shipped to the actors of other nodes
(`shipping`). The embedded default's tiny models are such folders, committed under `demo/weights/`
by the workshop `demo`, which the product never imports.

The package imports nothing itself, so `factory.models.locate` (used by the build's check phase)
does not pull torch, diffusers and transformers in with it.
"""
