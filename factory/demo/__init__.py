"""The embedded default's models, apart from the product's model loading (`factory.models`):
tiny models of the real architectures (`tiny`), their tokenizers (`tokenizers`), their training on
the procedural pedestrians (`training`), quality probes (`quality`), the committed weights
(`weights/`) and their installation (`models`); full-size architectures with random weights for
the benchmarks (`full_size`). `python -m factory.demo` rebuilds the demo models."""
