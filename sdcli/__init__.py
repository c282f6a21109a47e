"""sdcli: a small, scriptable command line for text-to-image diffusion on Hugging Face diffusers."""

__version__ = "0.1.0"
