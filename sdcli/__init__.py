"""sdcli: a small, scriptable command line for text-to-image diffusion on Hugging Face diffusers.

From Python: `sdcli.api` (load a model once, generate many images).
"""

__version__ = "0.1.0"
