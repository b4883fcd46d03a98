"""factory: the Diffusion-ReID generation pipeline (`python -m factory.build`)."""

import logging as _logging

# bitsandbytes (locked for generation.use_8bit_adam) is imported by diffusers/transformers
# whenever it is installed; on CPUs with AVX512-BF16 its CPU backend then warns that it cannot
# fetch an optional 4-bit kernel from the Hub. We never use 4-bit CPU kernels: keep it quiet.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
