"""The embedded default's workshop, a room of its own: tiny models of the real architectures
(`tiny`), their tokenizers (`tokenizers`), their training on the procedural pedestrians
(`training` and the per-model `train_text_to_image`, `train_captioner`, `train_clip`), the build
into `save_pretrained` folders (`models`) and the committed weights (`weights/`), which the demo
presets name as model folders. The product never imports this package: it loads those folders like
any model. `python -m demo` rebuilds the demo models."""
