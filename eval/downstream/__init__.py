"""Downstream Re-ID evaluation of a pre-trained backbone under Ray Tune (the paper's Sec. 4.2).

    python -m eval.downstream --backbone CKPT/backbone.safetensors [--config FILE] [--out DIR] [--set k=v]

or from Python::

    from eval.downstream.runner import run_downstream
    report = run_downstream(load_run_config("configs/demo.yaml").downstream, backbone="backbone.safetensors")

This package imports nothing itself: `core.settings.run` imports `core.settings.downstream` for
every preset, and must not pull in Ray Tune and torch with it.
"""
